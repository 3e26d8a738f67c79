"""Staged adapters (the gathered path's copies of grouped adapters, kept from step to step): a run of
steps whose adapters join, leave and change row counts, each checked against float64."""

import random

import pytest
import torch
from support.adapters import apply_calls, lora_reference, synthetic_adapter

from inference.adapters.peft_checkpoint import SHARED_INPUT, load_adapter_dir
from inference.backends.cpu import lora_routes as lora_batch
from inference.backends.cpu.lora import LoraBatch
from inference.backends.cpu.lora_routes import PAD_MAX_ROWS
from inference.backends.cpu.staging import StagedAdapters
from inference.lora_mapping import LoraMapping
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Each step: adapter name -> rows in the step ("a*" share one layout, "b*" another; None: rows
# without an adapter). A request leaving makes a hole, one joining fills it. Adapters with up to
# PAD_MAX_ROWS rows are one group per layout (padded to its largest row count: step 6); steps 4
# and 5 give two "a" adapters more rows, picked by their staged positions (``by_position``: the
# "a" adapters of the last step, lowest position first), so that the two groups of that layout
# hold each other's adapters: a few (read in place) in step 4, many (copied out) in step 5. (The
# test sets PAD_MAX_WASTE to 1: with the default, steps 4 and 5 pad all "a" adapters into one group.)
WIDE = PAD_MAX_ROWS + 2
STEPS = [
    lambda by_position: {"a0": 1, "a1": 1, "a2": 1, "a3": 1, "a4": 1, "a5": 1, "b0": 1, "b1": 1, None: 2},
    lambda by_position: {"a0": 1, "a1": 1, "a2": 1, "a3": 1, "a6": 1, "b0": 1, "b1": 1},  # a4, a5 leave; a6 joins
    lambda by_position: {"a0": 1, "a2": 1, "a3": 1, "a6": 1, "b0": 1, "b1": 1, None: 1},  # a1 leaves
    lambda by_position: {"a0": 1, "a2": 1, "a3": 1, "a6": 1, "a7": 1, "a8": 1, "a9": 1, "b0": 1, "b1": 1,
                         by_position[1]: WIDE, by_position[3]: WIDE},
    lambda by_position: {**{name: 1 for name in by_position}, "b0": WIDE, "b1": WIDE, None: 1,
                         by_position[0]: WIDE, by_position[-1]: WIDE},
    lambda by_position: {"a2": 2, "a3": 1, "a6": 1, "a7": 1, "a8": 1, "a9": 1, "b0": 1, "b1": 1},
]


def test_staged_groups_across_steps_match_float64(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(lora_batch, "PAD_MAX_WASTE", 1)
    rng = random.Random(random.getrandbits(64))  # from the seed the random_seed fixture prints
    seed = rng.randrange(1 << 30)
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=16 << 20))
    cfg = engine.model_config
    names = [f"a{i}" for i in range(10)] + ["b0", "b1"]
    residents, weights = {}, {}
    for i, name in enumerate(names):
        r, targets = (4, ("q_proj", "v_proj", "down_proj")) if name[0] == "a" else (8, ALL)
        path = synthetic_adapter(tmp_path / name, cfg, r=r, targets=targets, alpha=rng.uniform(1, 32), seed=seed + i)
        ref = engine.adapters.register_dir(name, path)
        assert engine.adapters.admit(ref).value == "ready"
        residents[name] = engine.adapters.resident(ref.uid)
        weights[name] = load_adapter_dir(path, cfg)
    staging = StagedAdapters(engine.pool)
    kinds, padded = set(), False
    by_position: list[str] = []
    for step, make_counts in enumerate(STEPS):
        counts = make_counts(by_position)
        chunks = [(name, n) for name, n in counts.items()]
        rng.shuffle(chunks)
        slot_names = sorted({name for name, _ in chunks if name is not None})
        slots = [residents[name] for name in slot_names]
        chunk_slots = [slot_names.index(name) if name is not None else -1 for name, _ in chunks]
        lengths = [n for _, n in chunks]
        batch = LoraBatch(LoraMapping.build(engine.pool, slots, chunk_slots, lengths), staging)
        kinds.update("sparse" if g.positions is not None else "gaps" if g.count > g.members else "dense"
                     for g in batch.groups)
        padded |= any(g.width == 2 for g in batch.groups)  # only a2 has 2 rows (step 6): the others are padded
        region = staging.regions[residents["a0"].layout]
        by_position = sorted((n for n in slot_names if n.startswith("a")), key=lambda n: region.where[residents[n].ref.uid])
        rows = [name for name, n in chunks for _ in range(n)]
        layer = rng.randrange(cfg.num_layers)
        shapes = cfg.linear_shapes()
        for calls in apply_calls(shapes, rng):  # the model's calls, then the families split or reordered
            for call in calls:
                x = torch.randn(len(rows), shapes[call[0]][0])
                outs = {module: torch.randn(len(rows), shapes[module][1]) for module in call}
                expected = {module: lora_reference(out, x, [weights.get(name) for name in rows], module, layer)
                            for module, out in outs.items()}
                batch.apply(layer, x, outs)
                for module, out in outs.items():
                    torch.testing.assert_close(out.double(), expected[module], rtol=1e-5, atol=1e-5,
                                               msg=f"step {step} {call} {module} seed {seed}")
    # every kind of group ran (a padded one in step 6); a request leaving was compacted; nobody was copied in twice
    assert kinds == {"dense", "gaps", "sparse"} and padded
    assert staging.moves >= 1
    assert staging.copies == len(names)
    assert set(staging.regions) and staging.nbytes == _region_bytes(staging) > 0


def _region_bytes(staging: StagedAdapters) -> int:
    """Bytes the regions should hold: every position of every layer, one adapter's buffer each."""
    layers, element_bytes = staging.pool.tensor.shape[0], staging.pool.tensor.element_size()
    return sum(r.positions * r.layer_elems * layers * element_bytes for r in staging.regions.values())


def _assert_staged(region, position: int, adapter, pool) -> None:
    """The adapter at ``position`` has, in every layer and module, the weights of its pool pages."""
    for layer in range(pool.tensor.shape[0]):
        packed = pool.tensor[layer, adapter.pages].reshape(-1)
        for module, (a_off, b_off, rank) in adapter.offsets.items():
            a, b_t = region.module_weights(layer, module, position, 1)
            assert torch.equal(a.reshape(-1), packed[a_off : a_off + a.numel()]) and a.shape[1] == rank
            assert torch.equal(b_t.reshape(-1), packed[b_off : b_off + b_t.numel()]) and b_t.shape[1] == rank
        # the A of the modules that share an input are side by side: one view of them all, in
        # family order (another order is two runs)
        for family in SHARED_INPUT:
            members = tuple(m for m in family if m in adapter.offsets)
            if len(members) < 2:
                continue
            [(run, where)] = region.input_runs(members)
            assert run == members and len(region.input_runs(members[::-1])) == len(members)
            a = region.run_weights(layer, where, position, 1)[0]
            expected = [packed[adapter.offsets[m][0] :][: adapter.offsets[m][2] * a.shape[1]] for m in members]
            assert torch.equal(a.reshape(-1), torch.cat(expected))


def test_staged_positions_are_kept_and_compacted(tmp_path, tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=16 << 20))
    adapters = []
    for i in range(5):
        path = synthetic_adapter(tmp_path / f"a{i}", engine.model_config, r=2, targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                                 alpha=4.0, seed=i)
        ref = engine.adapters.register_dir(f"a{i}", path)
        engine.adapters.admit(ref)
        adapters.append(engine.adapters.resident(ref.uid))
    staging = StagedAdapters(engine.pool, idle_steps=2)
    first = [p for _, p in staging.place(adapters[:4])]
    assert sorted(first) == [0, 1, 2, 3] and staging.copies == 4
    region = staging.place(adapters[:4])[0][0]
    for adapter, position in zip(adapters[:4], first):
        _assert_staged(region, position, adapter, engine.pool)
    # adapter 1 leaves: the one at the top moves into its place; the others stay where they were
    placed = dict(zip((0, 2, 3), (p for _, p in staging.place([adapters[0], adapters[2], adapters[3]]))))
    assert sorted(placed.values()) == [0, 1, 2] and staging.copies == 4 and staging.moves == 1
    assert placed[0] == first[0]
    moved = next(i for i in (0, 2, 3) if placed[i] != first[i])
    assert first[moved] == 3 and placed[moved] == first[1]
    _assert_staged(region, placed[moved], adapters[moved], engine.pool)
    # a new adapter takes the lowest free position and is copied in once
    placed = staging.place([adapters[0], adapters[2], adapters[3], adapters[4]])
    assert sorted(p for _, p in placed) == [0, 1, 2, 3] and staging.copies == 5
    # five at once: the region grows, and every adapter staged before keeps its weights
    placed = staging.place(adapters)
    assert region.positions == 5 and sorted(p for _, p in placed) == [0, 1, 2, 3, 4] and staging.copies == 6
    assert staging.nbytes == _region_bytes(staging)
    for adapter, (_, position) in zip(adapters, placed):
        _assert_staged(region, position, adapter, engine.pool)
    # a region no step uses for idle_steps steps is freed
    other = synthetic_adapter(tmp_path / "other", engine.model_config, r=3, targets=("k_proj",), alpha=4.0, seed=9)
    ref = engine.adapters.register_dir("other", other)
    engine.adapters.admit(ref)
    for _ in range(2):
        staging.place([engine.adapters.resident(ref.uid)])
    assert len(staging.regions) == 1 and staging.nbytes == _region_bytes(staging)


def test_idle_steps_must_be_positive(tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20))
    with pytest.raises(ValueError, match="idle_steps"):
        StagedAdapters(engine.pool, idle_steps=0)


def test_engine_decode_groups_read_their_rows_in_place(tmp_path, tiny_checkpoint):
    """The engine orders a step's chunks by staged position (``chunk_order``), so in a decode step
    with the same adapters as the step before, every group's rows are in staged order: its input is
    a slice of ``x`` and its results go back as one, with no gather and no permutation. Requests of
    different lengths leave and join, so adapters take positions others left, in another order
    than they arrived (and than their uids)."""
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=16 << 20, max_num_seqs=5))
    rng = random.Random(random.getrandbits(64))  # from the seed the random_seed fixture prints
    seed = rng.randrange(1 << 30)
    for i in range(9):
        path = synthetic_adapter(tmp_path / f"a{i}", engine.model_config, r=4, targets=("q_proj", "v_proj"),
                                 alpha=8.0, seed=seed + i)
        engine.adapters.register_dir(f"a{i}", path)
    batches = []
    make_batch = engine.runner.prepare_lora
    engine.runner.prepare_lora = lambda mapping: batches.append((make_batch(mapping), mapping)) or batches[-1][0]
    for i in range(9):
        params = SamplingParams(max_tokens=rng.randint(6, 14), temperature=0.0, ignore_eos=True)
        engine.add(engine.make_request([rng.randrange(1, 50) for _ in range(rng.randint(2, 6))], params,
                                       adapter_id=f"a{i}"))
    while engine.has_unfinished():
        engine.step()
    steady, previous = 0, None
    for batch, mapping in batches:  # every request has an adapter: each row has a slot
        adapters = {slot.ref.uid for slot in mapping.slots}
        if all(rows == 1 for rows in mapping.chunk_lengths) and adapters == previous and len(adapters) > 1:
            assert batch.groups and all(group.gather is None for group in batch.groups), f"seed {seed}"
            steady += 1
        previous = adapters
    # 9 adapters passed through at most 5 positions: newcomers took positions others had left
    staged = engine.backend.lora.staging
    [region] = staged.regions.values()
    assert steady >= 3 and region.positions <= 5 and staged.copies == 9, f"seed {seed}"
