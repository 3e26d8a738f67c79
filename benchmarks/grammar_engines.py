"""xgrammar against llguidance on the bundled model's vocabulary: compile time per schema and the
time to fill one step's token bitmask for a batch (the measurement behind the choice of grammar
engine, docs/design.md "Structured outputs"). Needs both packages; the engine itself uses only
llguidance.

    python -m benchmarks.grammar_engines [--batch 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.structured_outputs import SCHEMAS
from inference.bundled_model import prepare_bundled_model
from inference.structured.grammar import unpack_bitmask

VOCAB = 49152


def _run(name: str, make, fill, consume, stopped, batch: int, steps: int) -> None:
    """Compile every schema (``make``), then drive ``batch`` matchers for ``steps`` steps, each
    taking the argmax of random logits under the mask; print compile and fill times."""
    compile_ms, fill_ms = [], []
    for schema in SCHEMAS:
        started = time.perf_counter()
        new_matcher = make(schema)
        compile_ms.append((time.perf_counter() - started) * 1e3)
        matchers = [new_matcher() for _ in range(batch)]
        bitmask = torch.zeros(batch, (VOCAB + 31) // 32, dtype=torch.int32)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            started = time.perf_counter()
            for i, m in enumerate(matchers):
                if not stopped(m):
                    fill(m, bitmask, i)
            fill_ms.append((time.perf_counter() - started) * 1e3)
            logits = torch.randn(batch, VOCAB, generator=gen).masked_fill(~unpack_bitmask(bitmask, VOCAB), -1e9)
            for i, token in enumerate(logits.argmax(-1).tolist()):
                if not stopped(matchers[i]):
                    consume(matchers[i], token)
    fill_ms.sort()
    print(f"{name:>11}: compile ms {[round(c, 2) for c in compile_ms]}; fill ({batch} rows) median "
          f"{statistics.median(fill_ms):.2f} ms, p99 {fill_ms[int(0.99 * (len(fill_ms) - 1))]:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    import llguidance
    import llguidance.hf
    import xgrammar as xgr
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(prepare_bundled_model().path))
    started = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB), max_threads=1,
                                   cache_enabled=False)
    print(f"xgrammar tokenizer setup {time.perf_counter() - started:.2f} s")

    def xgr_make(schema):
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        return lambda: xgr.GrammarMatcher(compiled)

    _run("xgrammar", xgr_make, lambda m, b, i: m.fill_next_token_bitmask(b, i), lambda m, t: m.accept_token(t),
         lambda m: m.is_terminated(), args.batch, args.steps)
    started = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB)
    print(f"llguidance tokenizer setup {time.perf_counter() - started:.2f} s")

    def llg_make(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        first = llguidance.LLMatcher(tokenizer, grammar)
        assert not first.is_error(), first.get_error()
        return first.deep_copy

    def llg_fill(m, bitmask, i):
        row = bitmask[i]
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    _run("llguidance", llg_make, llg_fill, lambda m, t: m.consume_token(t), lambda m: m.is_stopped(),
         args.batch, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
