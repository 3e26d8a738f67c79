"""The data rules of adapter training (tenants/training/examples.py): masking checked by decoding the
labelled spans against the messages, prompts checked against the chat path's own rendering,
truncation, validation naming every problem, the seeded split."""

from __future__ import annotations

import random

import pytest

from inference.service.chat_prompt import render_chat
from inference.tokenizer import Tokenizer
from tenants.training.examples import (
    IGNORE_INDEX,
    MIN_EXAMPLES,
    InvalidExamplesError,
    TrainingRow,
    answer_spans,
    build_rows,
    eval_count,
    example_to_row,
    load_renderer,
    message_problems,
    prepare_training_data,
    split_keys,
    truncate_row,
    validate_examples,
)

END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"  # SmolLM2's template, when none is given


@pytest.fixture(scope="module")
def renderer(tiny_checkpoint):
    return load_renderer(tiny_checkpoint)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_checkpoint):
    return Tokenizer(tiny_checkpoint)


def _words(rng: random.Random, n: int) -> str:
    vocab = ["sun", "river", "blue", "quick", "seven", "honey", "garden", "Paris", "why", "maybe", "code", "42"]
    return " ".join(rng.choice(vocab) for _ in range(n)).capitalize() + rng.choice([".", "!", "?"])


def _conversation(rng: random.Random, turns: int, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": _words(rng, rng.randint(2, 9))})
        messages.append({"role": "assistant", "content": _words(rng, rng.randint(1, 12))})
    return messages


def _decoded_spans(renderer, row: TrainingRow) -> list[str]:
    tok = renderer.tokenizer
    for start, end in answer_spans(row.labels):
        assert row.labels[start:end] == row.input_ids[start:end]  # a label is the token at its position
    return [tok.decode(row.input_ids[s:e], skip_special_tokens=False) for s, e in answer_spans(row.labels)]


@pytest.mark.parametrize("system_case", ["none", "tenant", "example", "both"])
def test_every_answer_and_only_the_answers_are_labelled(renderer, chat_tokenizer, system_case):
    rng = random.Random(random.getrandbits(64))
    own = "You answer like a pirate." if system_case in ("example", "both") else None
    tenant = "You are the assistant of Acme." if system_case in ("tenant", "both") else None
    messages = _conversation(rng, rng.randint(1, 4), system=own)
    row = example_to_row(messages, renderer, key="x", system_prompt=tenant)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _decoded_spans(renderer, row) == [a + END for a in answers]
    assert row.labels[0] == IGNORE_INDEX and len(row.labels) == len(row.input_ids)
    # the context of each answer is exactly what chat sends to the engine before it
    tok = renderer.tokenizer
    conversation = [m for m in messages if m["role"] != "system"]
    system = own or tenant
    for (start, _), i in zip(answer_spans(row.labels), [k for k, m in enumerate(conversation) if m["role"] == "assistant"]):
        chat_prompt = render_chat(chat_tokenizer, system, conversation[:i], token_limit=10_000).token_ids
        assert row.input_ids[:start] == chat_prompt
        assert tok.decode(row.input_ids[:start], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    text = tok.decode(row.input_ids, skip_special_tokens=False)
    if system_case == "none":
        assert DEFAULT_SYSTEM in text  # the template's default, as chat renders it
    else:
        assert text.startswith(f"<|im_start|>system\n{system}{END}") and DEFAULT_SYSTEM not in text
    if system_case == "both":
        assert tenant not in text  # the example's own system message wins
    assert text.endswith(answers[-1] + END)  # the separator after the last answer is left out


def test_a_template_that_does_not_extend_its_prompt_is_refused(renderer):
    # Two newlines after the assistant header merge with the header's own newline into one token,
    # so the prompt chat would send is not a prefix of the rendered answer.
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
           {"role": "user", "content": "And?"}, {"role": "assistant", "content": "\n\nWell"}]
    example_to_row(good, renderer, key="fine")
    with pytest.raises(ValueError, match=r"example ex-7: .*message 3 \(assistant\).* not a prefix"):
        build_rows([good, bad], renderer, keys=["ex-6", "ex-7"])


def test_truncation_keeps_the_end_and_drops_cut_answers(renderer):
    rng = random.Random(random.getrandbits(64))
    long_answer = _words(rng, 60)
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": long_answer},
                {"role": "user", "content": "Shorter?"}, {"role": "assistant", "content": "Once, a fox."}]
    full = example_to_row(messages, renderer, key="t")
    first, second = answer_spans(full.labels)
    # a window that cuts into the first answer: its labels go, the second answer stays whole
    max_length = len(full.input_ids) - (first[0] + 5)
    row = truncate_row(full, max_length)
    assert row.truncated and len(row.input_ids) == max_length
    assert row.input_ids == full.input_ids[-max_length:]
    assert _decoded_spans(renderer, row) == ["Once, a fox." + END]
    # a window that starts right at the first answer's first token: no context before it, cleared too
    row = truncate_row(full, len(full.input_ids) - first[0])
    assert _decoded_spans(renderer, row) == ["Once, a fox." + END]
    # one more token of context and the first answer is kept whole
    row = truncate_row(full, len(full.input_ids) - first[0] + 1)
    assert _decoded_spans(renderer, row) == [long_answer + END, "Once, a fox." + END]
    assert truncate_row(full, len(full.input_ids)) is full
    # a last answer that does not fit: the example is dropped and reported, the others kept
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    lone = [{"role": "user", "content": "Story?"}, {"role": "assistant", "content": long_answer}]
    rows, dropped = build_rows([short, lone, short], renderer, max_length=40, keys=["a", "b", "c"])
    assert [r.key for r in rows] == ["a", "c"] and all(not r.truncated for r in rows)
    assert [d.key for d in dropped] == ["b"] and "does not fit in the last 40" in dropped[0].reason


def test_validation_names_every_problem_of_every_example():
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    examples = [
        ok,
        [{"role": "user", "content": "   "}, {"role": "bot", "content": "x"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}],
        [{"role": "assistant", "content": "first"}, {"role": "system", "content": "late"}, {"role": "assistant", "content": 3}],
        [{"role": "user", "content": "x" * 40_000, "name": "bob"}, {"role": "assistant", "content": "bad \ud800"}],
        [],
        "not a list",
    ]
    with pytest.raises(InvalidExamplesError) as info:
        validate_examples(examples, keys=["k0", "k1", "k2", "k3", "k4", "k5", "k6"])
    expected = [
        "example k1: message 0 content is empty",
        "example k1: message 1 role must be one of system, user, assistant, got 'bot'",
        "example k1: must end with an assistant turn",
        "example k2: must end with an assistant turn",
        "example k3: message 0 is an assistant turn where a user turn belongs",
        "example k3: message 1 is a system message; only the first message may be one",
        "example k3: message 2 is an assistant turn where a user turn belongs",
        "example k3: message 2 content must be a string, got int",
        "example k4: message 0 has unknown fields name",
        "example k4: message 0 content is 40000 characters, at most 32000",
        "example k4: message 1 content is not valid Unicode",
        "example k5: must be a non-empty list of messages",
        "example k6: must be a non-empty list of messages",
    ]
    problems = info.value.problems
    for needle in expected:
        assert sum(p.startswith(needle) for p in problems) == 1, (needle, problems)
    assert len(problems) == len(expected), problems
    assert not any("k0" in p for p in problems)
    assert str(len(expected)) in str(info.value)
    assert message_problems(ok) == []
    validate_examples([ok, ok])  # valid: no error


def test_the_split_is_seeded_disjoint_and_sized(random_seed):
    rng = random.Random(random.getrandbits(64))
    keys = [f"ex-{rng.getrandbits(40):x}" for _ in range(rng.randint(MIN_EXAMPLES, 60))]
    keys = list(dict.fromkeys(keys))
    train, held_out = split_keys(keys, seed=random_seed)
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(keys)
    assert len(held_out) == eval_count(len(keys)) == max(1, round(len(keys) * 0.2))
    assert train == [k for k in keys if k in set(train)]  # input order kept
    assert split_keys(list(reversed(keys)), seed=random_seed)[1] == list(reversed(held_out))  # same set
    assert split_keys(keys, seed=random_seed) == (train, held_out)
    others = {tuple(split_keys(keys, seed=random_seed + s)[1]) for s in range(1, 6)}
    assert len(others | {tuple(held_out)}) > 1  # the seed matters
    assert [len(split_keys([str(i) for i in range(n)], 0)[1]) for n in (4, 5, 7, 8, 12, 13, 100)] == [1, 1, 1, 2, 2, 3, 20]
    with pytest.raises(ValueError, match="at least 4"):
        split_keys(["a", "b", "c"], seed=0)


def test_prepare_training_data_needs_enough_usable_examples(renderer, random_seed):
    rng = random.Random(random.getrandbits(64))
    examples = [_conversation(rng, rng.randint(1, 3)) for _ in range(12)]
    keys = [f"id-{i}" for i in range(12)]
    data = prepare_training_data(examples, renderer, seed=random_seed, keys=keys, system_prompt="Be brief.")
    assert len(data.eval) == 2 and len(data.train) == 10 and not data.dropped
    assert {r.key for r in data.train}.isdisjoint({r.key for r in data.eval})
    assert [r.key for r in data.eval] == split_keys(keys, random_seed)[1]
    by_key = {r.key: r for r in data.train + data.eval}
    assert by_key["id-3"] == example_to_row(examples[3], renderer, key="id-3", system_prompt="Be brief.")
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _words(rng, 80)}]
    with pytest.raises(ValueError, match=r"3 usable examples; at least 4 are needed; example 3 dropped: "):
        prepare_training_data(examples[:3] + [long], renderer, seed=0, max_length=60)
