"""Structured outputs (``response_format``) in the engine: the grammar mask applied by the batched
sampler, checked on the bundled SmolLM2-135M with adapters, in batches mixed with free requests.

Every output that finishes with ``stop`` must parse and validate against its schema (the
independent ``jsonschema`` package); one cut by ``max_tokens`` says ``length``."""

from __future__ import annotations

import json
import random
import sys

import jsonschema
import pytest
import torch

import inference.engine as engine_module
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.request import FinishReason
from inference.sampling import SamplingParams
from inference.structured import StructuredOutput
from inference.structured.grammar import StructuredGrammars, unpack_bitmask
from support.adapters import synthetic_adapter
from support.engine_helpers import run_to_completion

llguidance = pytest.importorskip("llguidance")

NAME = {"type": "string", "maxLength": 12}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 1,
                                                                        "maximum": 9}},
     "required": ["ok", "count"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1}, "y": {"type": "number", "minimum": -1, "maximum": 1}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "country": {"enum": ["FR", "DE", "IT"]},
                                      "population": {"type": "integer", "minimum": 0, "maximum": 99999}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "number", "minimum": 0.5, "maximum": 2.5},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 50},
                                         "done": {"type": "boolean"}},
        "required": ["id", "done"], "additionalProperties": False}, "minItems": 1, "maxItems": 2}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"type": ["integer", "null"], "minimum": 0, "maximum": 5}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 200,
                                                                          "maximum": 299}},
     "required": ["status", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"first": NAME, "last": NAME, "nick": NAME}, "required": ["first", "last"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"],
                                "additionalProperties": False}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 100},
                                      "passed": {"type": "boolean"}}, "required": ["score", "passed"],
     "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"cat": NAME}, "required": ["cat"], "additionalProperties": False},
               {"type": "object", "properties": {"dog": NAME}, "required": ["dog"], "additionalProperties": False}]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2},
        "minItems": 2, "maxItems": 2}}, "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genres": {"type": "array", "items": {"enum": ["drama", "comedy"]},
                                                 "minItems": 1, "maxItems": 2}},
     "required": ["title", "year", "genres"], "additionalProperties": False},
]
MAX_TOKENS = 64
FREE_PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a haiku."]


def test_twenty_schemas_greedy_and_sampled_validate_with_adapters_in_a_mixed_batch(tmp_path, bundled_checkpoint,
                                                                                   monkeypatch):
    """40 constrained requests (each of the 20 schemas greedy and sampled, on the base model and two
    adapters) and 6 free ones in one engine run: every constrained output that stops is valid JSON of
    its schema; the free requests shared steps with them and are untouched by the masks."""
    assert len(SCHEMAS) == 20
    engine = LLMEngine(bundled_checkpoint, EngineConfig(pool_bytes=384 << 20, max_num_seqs=64))
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2)):
        engine.adapters.register_dir(name, synthetic_adapter(tmp_path / name, engine.model_config, r=rank,
                                                             targets=["q_proj", "v_proj"], alpha=16, seed=seed))
    mixed_steps = []
    real_sample = engine_module.sample

    def recording_sample(logits, params, generators, histories=None):
        mixed_steps.append(len({p.structured is None for p in params}) == 2)
        return real_sample(logits, params, generators, histories)

    monkeypatch.setattr(engine_module, "sample", recording_sample)
    expected: dict[str, dict] = {}
    for i, schema in enumerate(SCHEMAS):
        prompt = f"Reply with JSON of these keys: {', '.join(schema.get('properties', {})) or 'a value'}."
        for mode, extra in (("greedy", {"temperature": 0.0}), ("sampled", {"temperature": 1.0, "seed": 100 + i})):
            params = SamplingParams(max_tokens=MAX_TOKENS, structured=StructuredOutput.json_schema(schema, strict=True),
                                    **extra)
            rid = f"{mode}-{i}"
            engine.add(engine.make_request(prompt, params, rid, [None, "a", "b"][i % 3]))
            expected[rid] = schema
    free_ids = []
    for j, prompt in enumerate(FREE_PROMPTS * 2):
        rid = f"free-{j}"
        engine.add(engine.make_request(prompt, SamplingParams(max_tokens=24, temperature=0.0), rid,
                                       [None, "a"][j % 2]))
        free_ids.append(rid)
    finals = run_to_completion(engine)
    assert sum(mixed_steps) >= 10, "constrained and free requests must have shared steps"
    stopped = 0
    for rid, schema in expected.items():
        out = finals[rid]
        assert out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), (rid, out.finish_reason, out.error)
        if out.finish_reason is FinishReason.LENGTH:
            assert len(out.token_ids) == MAX_TOKENS
            continue
        stopped += 1
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
    assert stopped >= 36, f"only {stopped} of 40 constrained outputs completed within {MAX_TOKENS} tokens"
    assert engine.grammars.compilations == 20  # once per schema, whatever the number of requests
    for rid in free_ids:
        assert finals[rid].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_unpacked_bitmask_matches_llguidance_own_masking():
    """The sampler's bitmask unpacking against llguidance's own ``apply_token_bitmask_inplace``
    (an independent implementation) on random bitmasks, including the sign bit."""
    from llguidance.torch import apply_token_bitmask_inplace

    gen = torch.Generator().manual_seed(7)
    vocab = 49152 + 17  # not a multiple of 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), generator=gen, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(3, vocab, generator=gen)
    reference = logits.clone()
    apply_token_bitmask_inplace(reference, bitmask)
    ours = logits.masked_fill(~unpack_bitmask(bitmask, vocab), float("-inf"))
    assert torch.equal(ours, reference)


def test_bad_schemas_are_refused_with_the_reason(tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=8 << 20))
    cases = {
        "minimum": {"type": "integer", "minimum": 10, "maximum": 5},
        "nope": {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}},
    }
    for needle, schema in cases.items():
        with pytest.raises(ValueError, match=f"response_format: the schema cannot be used: .*{needle}"):
            engine.make_request([1, 2, 3], SamplingParams(structured=StructuredOutput.json_schema(schema)))
    # strict refuses a keyword the grammar engine cannot enforce; without strict it is ignored
    unsupported = {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentSchemas": {"a": {}}}
    with pytest.raises(ValueError, match="response_format"):
        engine.make_request([1, 2, 3], SamplingParams(structured=StructuredOutput.json_schema(unsupported, True)))
    engine.make_request([1, 2, 3], SamplingParams(structured=StructuredOutput.json_schema(unsupported, False)))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=StructuredOutput.json_object())


def test_grammar_cache_is_bounded_and_compiles_once(bundled_checkpoint):
    grammars = StructuredGrammars(bundled_checkpoint, 49152, frozenset({2}), max_entries=3)
    specs = [StructuredOutput.json_schema({"type": "integer", "minimum": 0, "maximum": k}) for k in range(5)]
    for spec in specs:
        grammars.matcher(spec)
        grammars.matcher(spec)
    assert grammars.compilations == 5 and len(grammars._cache) == 3
    grammars.matcher(specs[0])  # evicted: compiled again
    assert grammars.compilations == 6


def test_preempted_constrained_requests_give_the_same_valid_json(tiny_checkpoint):
    """Under page pressure constrained requests are preempted and recomputed: the matcher keeps
    following the output (nothing is replayed), and greedy outputs equal those of a roomy run."""
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "k": {"enum": ["x", "y", "zz"]}, "v": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["k", "v"], "additionalProperties": False}, "minItems": 3, "maxItems": 5}

    def run(pool_bytes: int) -> tuple[dict, int]:
        engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=pool_bytes, max_num_batched_tokens=64))
        rng = random.Random(5)
        for i in range(8):
            prompt = [rng.randrange(3, 2000) for _ in range(rng.randint(8, 30))]
            params = SamplingParams(max_tokens=80, temperature=0.0 if i % 2 else 0.8, seed=i,
                                    structured=StructuredOutput.json_schema(schema))
            engine.add(engine.make_request(prompt, params, f"r{i}"))
        return run_to_completion(engine), engine.scheduler.num_preemptions

    roomy, none = run(16 << 20)
    tight, preemptions = run(40 * 4 * 2 * 32 * 2 * 4)  # 40 pages: the 8 requests need about 100
    assert none == 0 and preemptions > 0
    for rid, out in tight.items():
        assert out.finish_reason is FinishReason.STOP, (rid, out.finish_reason, out.error)
        jsonschema.validate(json.loads(out.text), schema)
        assert out.token_ids == roomy[rid].token_ids


def test_without_llguidance_only_constrained_requests_are_refused(tiny_checkpoint, monkeypatch):
    """Where the grammar package is missing (the GPU machine has no network) the engine still
    runs free requests and refuses a constrained one with a clear reason."""
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance raises ImportError
    monkeypatch.setitem(sys.modules, "llguidance.hf", None)
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=8 << 20))
    with pytest.raises(ValueError, match="structured outputs need the llguidance package"):
        engine.make_request([1, 2, 3], SamplingParams(structured=StructuredOutput.json_object()))
    engine.add(engine.make_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0), "free"))
    assert run_to_completion(engine)["free"].finish_reason is FinishReason.LENGTH


def test_a_failing_matcher_fails_its_request_and_the_batch_goes_on(tiny_checkpoint):
    """A matcher whose mask computation raises ends its own request with ``error``; the free
    request beside it finishes normally."""
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=8 << 20))
    broken = engine.make_request([1, 2, 3], SamplingParams(max_tokens=8, structured=StructuredOutput.json_object()))

    class Exploding:
        def unsafe_compute_mask_ptr(self, *_):
            raise RuntimeError("boom")

    broken.grammar._m = Exploding()
    engine.add(broken)
    engine.add(engine.make_request([4, 5, 6], SamplingParams(max_tokens=4, temperature=0.0), "free"))
    finals = run_to_completion(engine)
    assert finals[broken.request_id].finish_reason is FinishReason.ERROR
    assert "boom" in finals[broken.request_id].error
    assert finals["free"].finish_reason is FinishReason.LENGTH and len(finals["free"].token_ids) == 4
