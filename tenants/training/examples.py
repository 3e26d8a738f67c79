"""The data rules of adapter training: what a training example is, how it is checked, how it becomes
a row of token ids and labels, and how examples are split into training and held-out rows.

An *example* is a conversation, a list of chat messages ``[{"role": "system" | "user" | "assistant",
"content": str}, ...]``: an optional system message first, then user and assistant turns
alternating, starting with a user turn and ending with an assistant turn. Every assistant turn is
an answer the adapter should learn to give (not only the last).

A *row* is the example rendered with the base model's chat template exactly as chat renders it
(``inference/service/chat_prompt.py``: the tenant's system prompt is prepended as a system message
when the example has none; with no system prompt at all the template's own default applies, as in
chat). Only assistant tokens carry labels: the answer's content and its end-of-turn token, never the
role header (``<|im_start|>assistant\\n``), the user's words, the system prompt or the separator
the template writes after the end-of-turn token. Every other position is ``IGNORE_INDEX`` (-100).

The labels do not rely on ``{% generation %}`` markers in the template (SmolLM2's has none). For
each assistant turn ``i`` the conversation is rendered twice: ``messages[:i]`` with the generation
prompt (what chat sends to the engine before the answer) and ``messages[:i + 1]`` without it. The
first must be an exact token prefix of the second, and the second of the whole example's rendering;
the tokens in between are the answer as the model would produce it, and they are labelled up to and
including the end-of-turn token (the tokenizer's ``eos_token``; generation stops there, so what the
template writes after it is never generated). A template or a text for which this does not hold
(an answer starting with characters that merge with the header's newline, say) raises a ValueError
naming the example: training on it would teach the model something else than what chat asks of it.

A row longer than ``max_length`` tokens keeps its end; an answer cut by that loses its labels, and an
example left without any labelled token is dropped and reported (``truncate_row``). The usable
examples are split into training and held-out rows by a seeded hash of their keys (``split_keys``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
"""The label of a position that carries no loss (PyTorch's cross-entropy ``ignore_index``)."""

ROLES = ("system", "user", "assistant")

MAX_MESSAGES = 200
"""Messages in one example, at most (a conversation longer than this is not one training example)."""

MAX_CONTENT_CHARS = 32_000
"""Characters in one message's content, at most (about 8k tokens, far beyond what a row keeps:
``DEFAULT_MAX_LENGTH``); a bound on the work one example can cause."""

DEFAULT_MAX_LENGTH = 1024
"""Tokens in a row, at most, by default. Longer rows keep their end (the last answers and the
context right before them). 1024 covers a chat turn with a long history (chat keeps
``TAILOR_HISTORY_TOKEN_BUDGET`` = 1536 tokens) well enough for style, and bounds the CPU time of a
step: attention and activations grow with the row."""

MIN_EXAMPLES = 4
"""Usable examples (after truncation dropped any) a training needs, at least: 3 to train on and 1
held out. Fewer cannot say anything about whether the adapter generalises."""

EVAL_FRACTION = 0.2
"""The share of usable examples held out for the evaluation loss (rounded to the nearest whole
example), never trained on."""

MIN_EVAL_EXAMPLES = 1
"""Held-out examples, at least, whatever the fraction gives."""


class InvalidExamplesError(ValueError):
    """Examples were refused. ``problems`` lists every violation found, each naming its example and
    message; ``str()`` shows them all."""

    def __init__(self, problems: Sequence[str]):
        self.problems: list[str] = list(problems) or ["unknown problem"]
        count = len(self.problems)
        header = f"invalid training examples ({count} problem{'s' if count != 1 else ''}):"
        super().__init__(header + "".join(f"\n  - {p}" for p in self.problems))


@dataclass(frozen=True)
class TrainingRow:
    """One example as token ids and labels, both ``[T]`` with ``T <= max_length``.

    ``labels[t]`` is the token at position ``t`` when it is an assistant token (equal to
    ``input_ids[t]``), else ``IGNORE_INDEX``. A causal LM predicts ``labels[t]`` from positions
    ``< t``, so ``labels[0]`` is always ``IGNORE_INDEX``.
    """

    key: str  # the example's name (its id, or its index as text)
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # tokens were cut off the front to fit max_length

    @property
    def labelled_tokens(self) -> int:
        """Positions that carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class DroppedExample:
    """An example that produced no row, and why."""

    key: str
    reason: str


@dataclass
class TrainingData:
    """Rows ready for the trainer: ``train`` and ``eval`` are disjoint (by example) and together
    hold every usable example; ``dropped`` names the examples that gave no row."""

    train: list[TrainingRow]
    eval: list[TrainingRow]
    dropped: list[DroppedExample] = field(default_factory=list)

    @property
    def example_count(self) -> int:
        return len(self.train) + len(self.eval)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def message_problems(messages: Any) -> list[str]:
    """Every problem of one example (an empty list when it is valid), each naming the message:
    not a non-empty list of messages, too many messages, a message that is not
    ``{"role", "content"}``, an unknown role, a system message that is not the first, user and
    assistant turns that do not alternate from a user turn, a last message that is not an assistant
    turn, empty (or whitespace-only) content, content over ``MAX_CONTENT_CHARS`` characters, or
    content that is not valid Unicode (a lone surrogate)."""
    if not isinstance(messages, list) or not messages:
        return ["must be a non-empty list of messages"]
    problems: list[str] = []
    if len(messages) > MAX_MESSAGES:
        problems.append(f"has {len(messages)} messages, at most {MAX_MESSAGES} are allowed")
    previous = None  # the role of the last user or assistant message
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            problems.append(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
            continue
        extra = sorted(str(k) for k in message if k not in ("role", "content"))
        if extra:
            problems.append(f"{where} has unknown fields {', '.join(extra)} (only 'role' and 'content')")
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where} role must be one of {', '.join(ROLES)}, got {role!r}")
        elif role == "system":
            if i != 0:
                problems.append(f"{where} is a system message; only the first message may be one")
        else:
            expected = "assistant" if previous == "user" else "user"
            previous = role
            if role != expected:
                problems.append(
                    f"{where} is {_a(role)} turn where {_a(expected)} turn belongs "
                    "(user and assistant turns alternate, starting with a user turn)"
                )
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(f"{where} content must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{where} content is empty")
        else:
            if len(content) > MAX_CONTENT_CHARS:
                problems.append(f"{where} content is {len(content)} characters, at most {MAX_CONTENT_CHARS}")
            try:
                content.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(f"{where} content is not valid Unicode (a lone surrogate)")
    last = messages[-1]
    if not (isinstance(last, Mapping) and last.get("role") == "assistant"):
        problems.append("must end with an assistant turn (the answer to learn)")
    return problems


def _a(role: str) -> str:
    return "an assistant" if role == "assistant" else f"a {role}"


def validate_examples(examples: Sequence[Any], keys: Sequence[str] | None = None) -> None:
    """Raise :class:`InvalidExamplesError` naming every problem of every example (``example <key>:
    message <i> ...``); return None when all are valid. ``keys`` name the examples (default: their
    index)."""
    names = _keys(examples, keys)
    problems = [f"example {name}: {p}" for name, example in zip(names, examples) for p in message_problems(example)]
    if problems:
        raise InvalidExamplesError(problems)


def _keys(examples: Sequence[Any], keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        return [str(i) for i in range(len(examples))]
    keys = [str(k) for k in keys]
    if len(keys) != len(examples):
        raise ValueError(f"{len(keys)} keys for {len(examples)} examples")
    if len(set(keys)) != len(keys):
        raise ValueError("example keys must be unique")
    return keys


# --------------------------------------------------------------------------------------------
# Rendering and masking
# --------------------------------------------------------------------------------------------


class ChatRenderer:
    """The base model's chat template as token ids, the way inference renders a chat.

    ``tokenizer`` is a Hugging Face tokenizer with a chat template (``load_renderer`` loads the
    checkpoint's). ``render(messages, True)`` equals ``inference.tokenizer.Tokenizer.apply_chat_template``
    (what the engine is given before it generates the answer).
    """

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the base model's tokenizer has no chat template; adapters are trained on chats")
        self.tokenizer = tokenizer
        self.end_of_turn_id: int | None = tokenizer.eos_token_id

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """Token ids ``[T]`` of ``messages`` with the template (and the assistant header when
        ``add_generation_prompt``)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]


def load_renderer(checkpoint_dir: str | Path) -> ChatRenderer:
    """The chat renderer of a Hugging Face checkpoint directory (its own tokenizer files; nothing is
    downloaded)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except Exception as exc:  # transformers raises many types for a directory it cannot read
        raise ValueError(f"cannot load the tokenizer of {checkpoint_dir}: {exc}") from exc
    return ChatRenderer(tokenizer)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``messages`` as chat renders them: the tenant's ``system_prompt`` first as a system message
    when there is one and the example has no system message of its own."""
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def example_to_row(
    messages: list[dict[str, str]],
    renderer: ChatRenderer,
    *,
    key: str = "0",
    system_prompt: str | None = None,
) -> TrainingRow:
    """The full (untruncated) row of one valid example: every assistant turn's content and
    end-of-turn token labelled, everything else ``IGNORE_INDEX``. Tokens after the last labelled
    one (the template's separator) are left out: they carry no loss and predict nothing.

    Raises ValueError naming the example when a rendering up to an assistant turn is not an exact
    token prefix of the rendering that includes it (or of the whole example's), and
    :class:`InvalidExamplesError` when the example breaks the rules of :func:`message_problems`."""
    problems = message_problems(messages)
    if problems:
        raise InvalidExamplesError([f"example {key}: {p}" for p in problems])
    conversation = with_system_prompt(messages, system_prompt)
    full = renderer.render(conversation, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = renderer.render(conversation[:i], add_generation_prompt=True)
        with_turn = renderer.render(conversation[: i + 1], add_generation_prompt=False)
        if with_turn[: len(prompt)] != prompt:
            raise ValueError(
                f"example {key}: the chat template does not render message {i} (assistant) as a "
                f"continuation of its prompt: the {len(prompt)} prompt tokens are not a prefix of the "
                "conversation including the answer (does the answer start with whitespace that merges "
                "with the template's header?)"
            )
        if full[: len(with_turn)] != with_turn:
            raise ValueError(
                f"example {key}: the chat template renders the conversation up to message {i} "
                "differently from the same messages inside the whole conversation"
            )
        answer = with_turn[len(prompt):]
        end = _answer_end(answer, renderer.end_of_turn_id)
        if end == 0:
            raise ValueError(f"example {key}: message {i} (assistant) renders to no tokens")
        labels[len(prompt): len(prompt) + end] = answer[:end]
    last = max(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    return TrainingRow(key=key, input_ids=full[: last + 1], labels=labels[: last + 1])


def _answer_end(answer: list[int], end_of_turn_id: int | None) -> int:
    """How many of an answer's rendered tokens are labelled: through its end-of-turn token (the
    last one in the answer), or all of them when the template writes none."""
    if end_of_turn_id is not None and end_of_turn_id in answer:
        return len(answer) - answer[::-1].index(end_of_turn_id)
    return len(answer)


def truncate_row(row: TrainingRow, max_length: int) -> TrainingRow:
    """``row`` cut to its last ``max_length`` tokens (the end holds the last answers).

    An answer whose first labelled token does not survive with at least one token before it loses
    all its labels: training on the tail of an answer, without its beginning and its prompt, would
    teach the model to continue text it never wrote under a context chat never gives it. The row
    may be left with no labelled token (its last answer alone is too long); callers drop it."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    if len(row.input_ids) <= max_length:
        return row
    cut = len(row.input_ids) - max_length
    labels = row.labels[cut:]
    for start, end in answer_spans(row.labels):
        if start - cut < 1:  # cut into, or nothing left before it in the window
            for t in range(max(start - cut, 0), max(end - cut, 0)):
                labels[t] = IGNORE_INDEX
    return TrainingRow(key=row.key, input_ids=row.input_ids[cut:], labels=labels, truncated=True)


def answer_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """The runs of labelled positions, ``[(start, end), ...]`` (end exclusive), in order: one per
    answer (a user turn always separates two answers)."""
    spans: list[tuple[int, int]] = []
    start = None
    for t, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = t
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, t))
            start = None
    return spans


def build_rows(
    examples: Sequence[list[dict[str, str]]],
    renderer: ChatRenderer,
    *,
    system_prompt: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    keys: Sequence[str] | None = None,
) -> tuple[list[TrainingRow], list[DroppedExample]]:
    """Validate ``examples`` (:class:`InvalidExamplesError` naming every problem), render each into
    a row and truncate it to ``max_length`` tokens (:func:`truncate_row`). An example of which no
    whole answer survives truncation is dropped and reported. Returns ``(rows, dropped)`` in the examples' order."""
    names = _keys(examples, keys)
    validate_examples(examples, names)
    rows: list[TrainingRow] = []
    dropped: list[DroppedExample] = []
    for name, example in zip(names, examples):
        full = example_to_row(example, renderer, key=name, system_prompt=system_prompt)
        row = truncate_row(full, max_length)
        if row.labelled_tokens == 0:
            dropped.append(DroppedExample(
                name, f"{len(full.input_ids)} tokens; its last answer does not fit in the last {max_length} "
                "with a token of context before it"
            ))
        else:
            rows.append(row)
    return rows, dropped


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def eval_count(total: int, eval_fraction: float = EVAL_FRACTION) -> int:
    """How many of ``total`` usable examples are held out: ``round(total * eval_fraction)``, at
    least ``MIN_EVAL_EXAMPLES`` (``total`` must be at least ``MIN_EXAMPLES``)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    return max(MIN_EVAL_EXAMPLES, int(total * eval_fraction + 0.5))


def split_keys(keys: Sequence[str], seed: int, eval_fraction: float = EVAL_FRACTION) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of example keys: ``(train, eval)``, disjoint, covering
    ``keys``, each in the input order; ``len(eval) == eval_count(len(keys))``.

    Keys are ranked by ``sha256(f"{seed}:{key}")`` and the first ones are held out. The rank of a
    key depends on the seed and the key alone (not on Python's ``random``, the platform or the other
    keys), so with example ids as keys an example added later never moves an earlier one from the
    held-out side to the training side unless it takes its place in the cut."""
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise ValueError("example keys must be unique")
    if len(keys) < MIN_EXAMPLES:
        raise ValueError(f"{len(keys)} usable examples; at least {MIN_EXAMPLES} are needed")
    n_eval = eval_count(len(keys), eval_fraction)
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode("utf-8", "surrogatepass")).digest())
    held_out = set(ranked[:n_eval])
    return [k for k in keys if k not in held_out], [k for k in keys if k in held_out]


def prepare_training_data(
    examples: Sequence[list[dict[str, str]]],
    renderer: ChatRenderer,
    *,
    seed: int,
    system_prompt: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    keys: Sequence[str] | None = None,
    eval_fraction: float = EVAL_FRACTION,
) -> TrainingData:
    """Everything from examples to rows: validate (every problem in one
    :class:`InvalidExamplesError`), render and mask, truncate (dropping examples with no answer
    token left), require ``MIN_EXAMPLES`` usable ones (ValueError naming the dropped ones
    otherwise) and split them by :func:`split_keys`."""
    rows, dropped = build_rows(examples, renderer, system_prompt=system_prompt, max_length=max_length, keys=keys)
    if len(rows) < MIN_EXAMPLES:
        detail = "".join(f"; example {d.key} dropped: {d.reason}" for d in dropped)
        raise ValueError(f"{len(rows)} usable examples; at least {MIN_EXAMPLES} are needed{detail}")
    train_keys, _ = split_keys([r.key for r in rows], seed, eval_fraction)
    train_set = set(train_keys)
    return TrainingData(
        train=[r for r in rows if r.key in train_set],
        eval=[r for r in rows if r.key not in train_set],
        dropped=dropped,
    )
