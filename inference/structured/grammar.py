"""Compiling structured outputs with llguidance, caching the grammars, and matching tokens.

llguidance (a maintained Rust grammar engine, one dependency-free wheel) was chosen over xgrammar
by measurement on this model's 49152-token vocabulary (docs/design.md, "Structured outputs").
It is imported lazily: the engine runs where it is missing, and only a constrained request is
refused there (:class:`GrammarUnavailableError`, a ValueError, so a 422 with the reason).

* :class:`StructuredGrammars` (one per engine) compiles each ``StructuredOutput`` once, in a worker
  thread with a wall-clock bound, and keeps the last ``max_entries`` compiled grammars (LRU), or the
  reason one does not compile. llguidance bounds the work of each mask step itself (lexer fuel,
  Earley items), so a pathological grammar fails a request instead of stalling the engine loop.
* :class:`GrammarMatcher` (one per request) fills the request's row of the step's token bitmask
  (bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed) and advances with every accepted
  token. Its count of consumed tokens follows the request's output: should the output ever be
  shorter than what the matcher consumed, :meth:`GrammarMatcher.sync` rolls the difference back
  (preemption by recompute keeps the output, so in practice nothing is rolled back).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from inference.structured import StructuredOutput

COMPILE_TIMEOUT_S = 10.0
_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a small model cannot loop on blanks


class GrammarUnavailableError(ValueError):
    """The grammar engine (llguidance) is not installed here."""


class GrammarMatcher:
    """One request's grammar state (engine thread only once the request is queued)."""

    def __init__(self, matcher: Any, eos_token_ids: frozenset[int]):
        self._m = matcher
        self.eos_token_ids = eos_token_ids
        self.num_consumed = 0  # tokens consumed (an accepted EOS is not consumed)
        self.error: str | None = None

    def sync(self, num_output_tokens: int) -> None:
        """Roll back the tokens consumed beyond the request's ``num_output_tokens``."""
        extra = self.num_consumed - num_output_tokens
        if extra > 0:
            self._m.rollback(extra)
            self.num_consumed -= extra

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32, contiguous, CPU). When the
        matcher failed (a resource limit, say), only the end-of-sequence tokens are allowed."""
        target = bitmask[row]
        if self.error is None:
            self.error = self._compute_mask(target)
        if self.error is not None:
            target.zero_()
            for token_id in self.eos_token_ids:
                if token_id < target.numel() * 32:
                    target[token_id // 32] |= _bit(token_id % 32)

    def _compute_mask(self, target: torch.Tensor) -> str | None:
        """Fill ``target`` from the matcher; the reason it failed, or None."""
        try:
            self._m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())
        except Exception as exc:  # misuse at the API level: this request fails, the loop goes on
            return f"the output grammar failed: {exc}"
        if self._m.is_error():
            return f"the output grammar failed: {self._m.get_error()}"
        return None if bool(target.any()) else "the output grammar allows no next token"

    def accept(self, token_id: int) -> bool:
        """Advance with ``token_id``; False (and ``error`` set) when the grammar does not allow it.
        An end-of-sequence token is allowed only where the output is complete."""
        if self.error is not None:
            return False
        if token_id in self.eos_token_ids:
            if self._m.is_accepting():
                return True
            self.error = "the output ended before it was complete"
            return False
        if not self._m.consume_token(token_id):
            self.error = f"the output grammar refused token {token_id}: {self._m.get_error()}"
            return False
        self.num_consumed += 1
        return True

    @property
    def complete(self) -> bool:
        """The output is complete and nothing but end-of-sequence may follow."""
        return self.error is None and self._m.is_stopped() and self._m.is_accepting()


def _bit(position: int) -> int:
    """Bit ``position`` of an int32 word (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V/32)] int32 bitmask -> [R, vocab_size] bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class StructuredGrammars:
    """Compiles ``StructuredOutput``s for one tokenizer, caches them, and makes matchers.

    Thread-safe: requests are made on the callers' threads (``LLMEngine.make_request``).
    """

    def __init__(self, checkpoint_dir: Path, vocab_size: int, eos_token_ids: frozenset[int],
                 max_entries: int = 256, compile_timeout_s: float = COMPILE_TIMEOUT_S):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_entries = max_entries
        self.compile_timeout_s = compile_timeout_s
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()  # a fresh matcher, or the error text
        self._tokenizer: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")
        self.compilations = 0

    def load(self) -> None:
        """Build the grammar engine's view of the tokenizer now (else on the first constrained
        request); GrammarUnavailableError where llguidance is missing."""
        self._llg_tokenizer()

    def _llg_tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                try:
                    import llguidance.hf
                except ImportError as exc:
                    raise GrammarUnavailableError(
                        "structured outputs need the llguidance package, which is not installed "
                        "on this inference server") from exc
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(str(self.checkpoint_dir))
                self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size,
                                                               eos_token=sorted(self.eos_token_ids))
            return self._tokenizer

    def _compile(self, spec: StructuredOutput) -> Any:
        """A fresh llguidance matcher for ``spec``, or the reason it does not compile (a str)."""
        import llguidance

        tokenizer = self._llg_tokenizer()
        options = {**_JSON_OPTIONS, "lenient": not spec.strict}
        try:
            if spec.kind == "lark":
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.schema)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.schema_object(), overrides=options)
        except Exception as exc:  # llguidance reports schema errors as ValueError (or RuntimeError)
            return str(exc)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            return "; ".join(messages)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return matcher.get_error()
        self.compilations += 1
        return matcher

    def _entry(self, spec: StructuredOutput) -> Any:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        self._llg_tokenizer()  # GrammarUnavailableError where llguidance is missing
        future = self._pool.submit(self._compile, spec)
        try:
            entry = future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            return f"the schema did not compile within {self.compile_timeout_s:g} s"
        with self._lock:
            self._cache[spec] = entry
            self._cache.move_to_end(spec)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return entry

    def _served(self, spec: StructuredOutput) -> tuple[Any, list[str]]:
        """``spec``'s compiled grammar and [] when it can be served, else None and why; compiles
        it (or reads the cache)."""
        found = spec.problems()
        if found:
            return None, [f"{spec.origin}: {p}" for p in found]
        try:
            entry = self._entry(spec)
        except GrammarUnavailableError as exc:
            return None, [f"{spec.origin}: {exc}"]
        if isinstance(entry, str):
            what = "the grammar" if spec.kind == "lark" else "the schema"
            return None, [f"{spec.origin}: {what} cannot be used: {entry}"]
        return entry, []

    def problems(self, spec: StructuredOutput) -> list[str]:
        """Why ``spec`` cannot be served ([] when it can); compiles it (or reads the cache)."""
        return self._served(spec)[1]

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A new matcher for ``spec``; ValueError naming the problems if it cannot be served."""
        entry, problems = self._served(spec)
        if problems:
            raise ValueError("; ".join(problems))
        with self._lock:
            fresh = entry.deep_copy()
        return GrammarMatcher(fresh, self.eos_token_ids)
