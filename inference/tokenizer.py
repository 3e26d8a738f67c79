"""Tokenizer and chat template of a checkpoint directory (transformers' tokenizer only)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from inference.tool_calls import ToolCallFormat, detect_format


class Tokenizer:
    """Encodes prompts, renders chats, decodes outputs."""

    def __init__(self, checkpoint_dir: Path):
        try:
            self._tok = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        except Exception as exc:
            raise ValueError(f"cannot load the tokenizer of {checkpoint_dir}: {exc}") from exc
        self.eos_token_id: int | None = self._tok.eos_token_id
        self._pieces: dict[int, tuple[str, bytes]] = {}  # token_pieces' cache (a dict write is thread-safe)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_window(self, window: list[int], read: int, skip_special_tokens: bool = True, final: bool = False) -> str:
        """Text that ``window[read:]`` adds after ``window[:read]`` (incremental detokenization).

        Decoding a short window instead of the whole output keeps each step O(window). Returns ""
        while the new tokens end inside a multi-byte character (unless ``final``), so callers keep
        the window and retry with the next token.
        """
        prefix = self._tok.decode(window[:read], skip_special_tokens=skip_special_tokens)
        full = self._tok.decode(window, skip_special_tokens=skip_special_tokens)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            return full[len(prefix):]
        return ""

    def token_pieces(self, token_ids: list[int]) -> list[tuple[str, bytes]]:
        """Each token's own text and exact bytes (for logprobs): a byte-level BPE token's bytes
        come from its vocabulary entry (one may end inside a UTF-8 character: its text then holds
        U+FFFD); other tokenizers' from decoding the token alone. Special tokens keep their text."""
        out = []
        for token_id in token_ids:
            piece = self._pieces.get(token_id)
            if piece is None:
                piece = self._piece(token_id)
                self._pieces[token_id] = piece
            out.append(piece)
        return out

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        name = self._tok.convert_ids_to_tokens(token_id)
        decoder = type(getattr(getattr(self._tok, "backend_tokenizer", None), "decoder", None)).__name__
        table = _byte_level_decoder()
        if decoder == "ByteLevel" and isinstance(name, str) and all(ch in table for ch in name):
            raw = bytes(table[ch] for ch in name)
        else:
            raw = self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), raw

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    @functools.cached_property
    def renders_tools(self) -> bool:
        """The chat template reads a ``tools`` variable (so it can tell the model its functions)."""
        return bool(self._tool_templates())

    @functools.cached_property
    def tool_call_format(self) -> ToolCallFormat | None:
        """The tool-call format the template teaches (``inference.tool_calls``), or None."""
        return next((f for f in map(detect_format, self._tool_templates()) if f is not None), None)

    def added_token_ids(self, texts: Iterable[str]) -> dict[str, int]:
        """Those of ``texts`` that the tokenizer holds as single added tokens, with their ids."""
        added = self._tok.get_added_vocab()
        return {t: added[t] for t in texts if t in added}

    def _tool_templates(self) -> list[str]:
        """The chat templates that read ``tools`` (a checkpoint may name several, e.g. ``default``
        and ``tool_use``)."""
        template = getattr(self._tok, "chat_template", None)
        templates = [t for t in template.values() if isinstance(t, str)] if isinstance(template, dict) else \
            [template] if isinstance(template, str) else []
        return [t for t in templates if "tools" in _template_variables(t)]

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the model's template plus the assistant prompt;
        ``tools``: the functions (OpenAI's tool objects) for a template that renders them."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template")
        problems = _message_problems(messages)
        if problems:
            raise ValueError("invalid chat messages: " + "; ".join(problems))
        extra = {"tools": tools} if tools else {}
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (``bytes_to_unicode``) inverted: vocabulary character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@functools.lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    """The variables a Jinja template reads from its context."""
    import jinja2
    import jinja2.meta

    try:
        return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateSyntaxError:
        return frozenset()


def _message_problems(messages: Any) -> list[str]:
    """What is wrong with a chat: each message a dict with a ``role`` (system, user, assistant or
    tool) and a string ``content``; an assistant message may instead carry ``tool_calls`` (content
    None), and a tool message names the call it answers (``tool_call_id``)."""
    if not isinstance(messages, list) or not messages:
        return ["a conversation must be a non-empty list of messages"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"message {i} must be a dict with 'role' and 'content'")
            continue
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            problems.append(f"message {i} role must be system, user, assistant or tool, got {role!r}")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not calls):
            problems.append(f"message {i}: only an assistant message has tool_calls (a non-empty list)")
        if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
            problems.append(f"message {i} content must be a string")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            problems.append(f"message {i}: a tool message needs the tool_call_id it answers")
    return problems
