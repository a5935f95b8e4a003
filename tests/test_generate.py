"""The one generation layer (laten_ray/generate): Sampling checks itself, the transformers
engine's one decoding loop gives the same text batched (evaluation) and streamed (the server),
and stops at a stop string instead of decoding to max_tokens."""
from __future__ import annotations

import asyncio

import pytest
import torch

from laten_ray.eval.protocol import prompt_text
from laten_ray.generate import Sampling
from laten_ray.generate.hf import HFEngine
from laten_ray.generate.stops import StopScanner

MODEL = "tiny:demo-source"


@pytest.mark.parametrize("field, value, says", [
    ("max_tokens", -1, "an integer >= 0"), ("max_tokens", 2.5, "an integer >= 0"),
    ("temperature", "0.5", "a number >= 0"), ("temperature", float("nan"), "a number >= 0"),
    ("top_p", 0, "in (0, 1]"), ("n", 0, "an integer >= 1"), ("n", True, "an integer >= 1"),
    ("stop", "###", "a list of strings"), ("stop", [1], "a list of strings"),
    ("seed", 1 << 64, "at most 64 bits"), ("top_k", -2, "-1, 0"), ("min_p", 1.5, "[0, 1]"),
    ("presence_penalty", 3, "[-2, 2]"), ("repetition_penalty", 0, "> 0"),
    ("logit_bias", {"5": 1.0}, "token ids to finite numbers"), ("logprobs", -1, "null or an integer >= 0"),
    ("ignore_eos", "yes", "a boolean"),
])
def test_sampling_refuses_a_bad_value_by_name(field, value, says):
    with pytest.raises(ValueError, match=rf"sampling: '{field}' must be .*{__import__('re').escape(says)}"):
        Sampling(**{field: value})


def test_evaluation_settings_with_a_bad_sampling_value_fail_by_name():
    from laten_ray.eval.evaluate import sampling_for
    with pytest.raises(ValueError, match=r"sampling: 'top_p' must be a number in \(0, 1\], got 7"):
        sampling_for("gsm8k", {"top_p": 7})
    with pytest.raises(ValueError, match=r"'max_tokens' must be >= 1 for evaluation, got 0"):
        sampling_for("gsm8k", {"max_tokens": 0})


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return HFEngine(MODEL, batch_size=3)


def streamed(engine: HFEngine, ids: list[int], s: Sampling) -> list[tuple[str, str | None]]:
    async def run():
        return [(item[0], item[1], item[2]) async for item in engine.stream(ids, s)]
    return asyncio.run(run())


QUESTIONS = ["What is 2 + 3?", "What is 10 + 7?", "What is 4 + 4?", "What is 1 + 9?", "What is 6 + 2?"]


@pytest.mark.parametrize("s", [
    Sampling(max_tokens=24),
    Sampling(max_tokens=24, stop=["answer is", "7 *"]),
    Sampling(max_tokens=16, temperature=1.0, seed=7, top_k=20),
], ids=["greedy", "stops", "sampled"])
def test_batched_and_streamed_decoding_give_the_same_text(engine, s):
    """Evaluation's batches (left-padded, 5 prompts in batches of 3) and the server's stream (one
    sequence) run the same loop: the same text per prompt, and the stream's deltas never show
    a stop string or text after it."""
    prompts = [engine.encode(prompt_text(q)) for q in QUESTIONS]
    if s.temperature == 0:
        batched = [texts[0] for texts in engine.generate_ids(prompts, s)]
    else:  # a seeded sample depends on the batch it is drawn in: one prompt at a time
        batched = [engine.generate_ids([p], s)[0][0] for p in prompts]
    for ids, expected in zip(prompts, batched):
        items = streamed(engine, ids, s)
        text = "".join(delta for _, delta, _ in items)
        assert text == expected
        assert items[-1][2] in ("stop", "length") and all(finish is None for _, _, finish in items[:-1])
        assert not any(x in text for x in s.stop)
    if s.stop:
        assert any(t != engine.generate_ids([p], Sampling(max_tokens=24))[0][0] for p, t in zip(prompts, batched))


def test_decoding_stops_at_a_stop_string_not_at_max_tokens(engine):
    """A row that has produced a stop string is not decoded further (the old batch loop ran every
    row to max_tokens and cut afterwards)."""
    ids = engine.encode(prompt_text(QUESTIONS[0]))
    free = engine.generate_ids([ids], Sampling(max_tokens=40))[0][0]
    assert len(free) > 3
    stop = free[2:4]
    before = engine.progress.tokens
    text = engine.generate_ids([ids], Sampling(max_tokens=40, stop=[stop]))[0][0]
    steps = engine.progress.tokens - before
    assert text == free[:free.find(stop)]
    assert steps < len(engine.encode(free, special=False)) + 2 and steps < 40


def test_stop_scanner_holds_back_a_possible_stop_and_half_characters(engine):
    """Deltas never end in a prefix of a stop string or in part of a character; together with
    the rest they are the whole text."""
    tok = engine.tokenizer
    text = "ab é ab\u00e9c END tail"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    scanner, pieces = StopScanner(tok, ["END"]), []
    for token in ids:
        delta, stopped = scanner.push(token)
        pieces.append(delta)
        assert not delta.endswith(("E", "EN", "\ufffd"))
        if stopped:
            break
    assert "".join(pieces) + scanner.rest() == tok.decode(ids, skip_special_tokens=True).split("END")[0]
