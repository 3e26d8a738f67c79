"""LoraBatch (the per-step LoRA applier) against a float64 computation from the adapters' weights."""

import random
from collections import Counter

import pytest
import torch
from support.adapters import apply_calls, lora_reference, synthetic_adapter

from inference.adapters.peft_checkpoint import load_adapter_dir
from inference.backends.cpu import lora_routes as lora_batch
from inference.backends.cpu.lora import LoraBatch
from inference.backends.cpu.lora_routes import SEGMENT_MIN_ROWS, chunk_order
from inference.backends.cpu.staging import StagedAdapters
from inference.backends.triton_backend import TritonLoraBatch
from inference.lora_mapping import LoraMapping
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# chunk lengths of a step; runs of SEGMENT_MIN_ROWS rows of one adapter (alone or merged from
# adjacent chunks) are segments on the gathered path, the others go to groups, segments or per-row
MIN = SEGMENT_MIN_ROWS
LENGTHS = {
    "decode": [1] * 9,
    "mixed": [MIN + 1, 1, 3, MIN // 2, MIN - MIN // 2, 1, 2, 1, 4, 1],  # chunks 3 and 4 merge
    "prefill": [3, MIN + 2, 5, 2, 9, 2, 1],
    "sorted": [1] * 6,  # decode rows in the engine's order (chunk_order), twins and random others
    "interleaved": [1] * 5,  # two groups whose rows alternate
    "permuted": [1] * 5,  # two groups, each one run of rows in another order than it is staged
    "widths": [1, 6, 2, 2, 2],  # layout twins with 1 and 6 rows: one group padded to 6, or none
}
# (rank, targets) of the adapters; 0/4 and 1/5 share a layout (a group on the gathered path)
SPECS = [(1, ("q_proj", "v_proj")), (8, ALL), (5, ("gate_proj", "down_proj")), (16, ("k_proj", "o_proj", "up_proj")),
         (1, ("q_proj", "v_proj")), (8, ALL)]
# the gathered path's routing knobs per variant: (GROUP_MIN_SLOTS, MAX_SOLO_SEGMENTS, PAD_MAX_WASTE)
ROUTES = {"gathered": None, "gathered-per-row": (1 << 30, 0, 4), "gathered-segments": (1 << 30, 1 << 30, 4),
          "gathered-exact": (2, 4, 1)}


def prepare(engine, residents, chunk_slots, lengths, use_triton, staging):
    """The step's LoRA as the engine's backend prepares it: the Triton backend's or the CPU one's."""
    mapping = LoraMapping.build(engine.pool, residents, chunk_slots, lengths)
    return TritonLoraBatch(mapping) if use_triton else LoraBatch(mapping, staging)


@pytest.mark.parametrize("variant", [*ROUTES, "triton-interpreted"])
@pytest.mark.parametrize("shape", list(LENGTHS))
def test_lora_batch_matches_float64(tmp_path, tiny_checkpoint, monkeypatch, shape, variant):
    """Every module of a random layer, rows of six adapters (ranks 1 to 16, different targets, two
    pairs sharing a layout) and rows without one, on every route of the CPU (gathered) path and on
    the Triton kernels (interpreted)."""
    use_triton = variant == "triton-interpreted"
    if use_triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if ROUTES.get(variant):
        group_min, solo_max, pad_waste = ROUTES[variant]
        monkeypatch.setattr(lora_batch, "GROUP_MIN_SLOTS", group_min)
        monkeypatch.setattr(lora_batch, "MAX_SOLO_SEGMENTS", solo_max)
        monkeypatch.setattr(lora_batch, "PAD_MAX_WASTE", pad_waste)
    rng = random.Random(random.getrandbits(64))  # from the seed the random_seed fixture prints
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20))
    cfg = engine.model_config
    residents, host = [], []
    for i, (r, targets) in enumerate(SPECS):
        path = synthetic_adapter(tmp_path / f"a{i}", cfg, r=r, targets=targets, alpha=rng.uniform(1, 32), seed=seed + i)
        ref = engine.adapters.register_dir(f"a{i}", path)
        assert engine.adapters.admit(ref).value == "ready"
        residents.append(engine.adapters.resident(ref.uid))
        host.append(load_adapter_dir(path, cfg))
    lengths = LENGTHS[shape]
    chunk_slots = [rng.choice([-1, 0, 1, 2, 3, 4, 5]) for _ in lengths]
    chunk_slots[0], chunk_slots[1] = 1, 0  # the all-module adapter on a long chunk, another after it
    chunk_slots[-2], chunk_slots[-1] = 4, 5  # the layout twins of both
    if shape == "mixed":
        chunk_slots[3] = chunk_slots[4] = 2
        # the all-module adapter again, one row: in a group with its twin, and also a segment
        chunk_slots = [s if s != 5 else 3 for s in chunk_slots[:-1]] + [5]
        chunk_slots[5] = 1
    if shape == "sorted":  # the engine's order (chunk_order): each group's rows are one run
        chunk_slots = [rng.choice([-1, 2, 3]) for _ in lengths] + [0, 4, 1, 5]
        lengths = [1] * len(chunk_slots)
        slot_rows = Counter(s for s in chunk_slots if s >= 0)
        chunk_slots.sort(key=lambda s: chunk_order(residents[s] if s >= 0 else None, slot_rows[s]))
    if shape == "interleaved":
        chunk_slots = [0, 1, 4, 5, -1]
    if shape == "widths":
        chunk_slots = [0, 4, -1, 1, 5]
    staging = StagedAdapters(engine.pool)
    if shape == "permuted":  # a step before this one staged the twins in the order 0, 4 and 1, 5
        prepare(engine, residents, [0, 4, 1, 5], [1] * 4, use_triton, staging)
        chunk_slots = [-1, 4, 0, 5, 1]
    batch = prepare(engine, residents, chunk_slots, lengths, use_triton, staging)
    assert isinstance(batch, TritonLoraBatch) == use_triton
    if use_triton:  # one-token chunks take the decode kernels, longer ones the segment kernels
        with_adapter = [n for s, n in zip(chunk_slots, lengths) if s >= 0]
        expected = [key for key, wanted in (("row_slot", 1 in with_adapter), ("seg_start", max(with_adapter) > 1))
                    if wanted]
        assert [next(iter(launch)) for launch in batch.launches] == expected
    if variant == "gathered" and shape in ("sorted", "interleaved", "permuted"):
        # groups of layout twins with equal row counts; results go back by a slice when their rows
        # are in staged order (the engine's order), by a permutation when they are one run, else
        # by index_add_
        assert len(batch.groups) == 2
        routes = {"sorted": "slice", "permuted": "permutation", "interleaved": "index_add"}
        assert [routes[shape]] * 2 == ["slice" if g.gather is None else "permutation" if g.scatter is not None
                                        else "index_add" for g in batch.groups]
    if shape == "widths" and variant in ("gathered", "gathered-exact"):
        # 2 x 6 product rows for 7 rows is within PAD_MAX_WASTE (4); with 1, the 1-row twin and the
        # 6-row twin are in different row classes, each alone: segments
        assert sorted(g.width for g in batch.groups) == ([2, 6] if variant == "gathered" else [2])
    elif variant == "gathered-per-row":
        assert not batch.groups and len(batch.single_rows) > 0
    elif variant == "gathered-segments":
        assert not batch.groups and len(batch.single_rows) == 0
        assert sum(s.length for s in batch.segments) == sum(n for s, n in zip(chunk_slots, lengths) if s >= 0)
    rows = [s for s, n in zip(chunk_slots, lengths) for _ in range(n)]
    layer = rng.randrange(cfg.num_layers)
    shapes = cfg.linear_shapes()
    for calls in apply_calls(shapes, rng):  # the model's calls, then the families split or reordered
        for call in calls:
            x = torch.randn(len(rows), shapes[call[0]][0])
            bases = {module: torch.randn(len(rows), shapes[module][1]) for module in call}
            outs = {module: base.clone() for module, base in bases.items()}
            batch.apply(layer, x, outs)
            for module in call:
                expected = lora_reference(bases[module], x, [host[s] if s >= 0 else None for s in rows], module, layer)
                torch.testing.assert_close(outs[module].double(), expected, rtol=1e-5, atol=1e-5,
                                           msg=f"{call} {module} seed {seed}")
                assert (not torch.equal(outs[module], bases[module])
                        or all(s < 0 or module not in host[s].modules for s in rows))
