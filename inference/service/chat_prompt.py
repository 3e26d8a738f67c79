"""Rendering a chat for the engine: the system prompt plus the newest messages that fit a token
budget, with the model's chat template."""

from __future__ import annotations

from dataclasses import dataclass

from inference.service.protocol import InferenceError
from inference.tokenizer import Tokenizer


@dataclass
class RenderedPrompt:
    token_ids: list[int]
    messages_used: int  # how many of the request's messages made it into the prompt


def render_chat(
    tokenizer: Tokenizer, system_prompt: str | None, messages: list[dict], token_limit: int
) -> RenderedPrompt:
    """Render ``system_prompt`` + the newest messages that fit ``token_limit`` tokens.

    Fitting is monotone in how many old messages are dropped, so a binary search finds the longest
    suffix that fits; the suffix starts at a user turn when it can. The last message always stays:
    if it does not fit on its own, InferenceError(422).
    """
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    cache: dict[int, list[int]] = {}

    def ids_from(start: int) -> list[int]:
        if start not in cache:
            try:
                cache[start] = tokenizer.apply_chat_template(prefix + messages[start:])
            except (ValueError, TypeError) as exc:  # TypeError: text the tokenizer cannot encode
                raise InferenceError.invalid(f"the messages cannot be tokenized: {exc}") from exc
        return cache[start]

    last = len(messages) - 1
    if len(ids_from(last)) > token_limit:
        raise InferenceError.invalid(
            f"the message is {len(ids_from(last))} tokens with the system prompt and chat template; "
            f"at most {token_limit} fit"
        )
    lo, hi = 0, last
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids_from(mid)) <= token_limit:
            hi = mid
        else:
            lo = mid + 1
    start = lo
    while start < last and messages[start]["role"] == "assistant":
        start += 1  # a history should not open with half of an exchange
    return RenderedPrompt(ids_from(start), len(messages) - start)
