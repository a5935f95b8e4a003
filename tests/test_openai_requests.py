"""What the OpenAI API lets a client send, checked without a server (test_serve.py sends the same
over HTTP with the openai client): every field is used, refused naming it, or (changing nothing
here) accepted and logged; and the sampling controls do in the engines what vLLM's do."""
import pytest
import torch

from laten_ray.generate.sampling import Sampling, generator, next_tokens, penalized
from laten_ray.serve.openai import ApiError, ServeLimits, check_chars, check_ids, parse_json, parse_request


def parse(body, chat=False):
    return parse_request({"model": "m", **body}, chat, "m", ServeLimits())


def refused(body, chat=False) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, chat)
    return e.value


def test_prompts_as_token_ids_and_chat_content_parts_and_every_role():
    assert parse({"prompt": [1, 2, 3]}).prompt == [[1, 2, 3]]
    assert parse({"prompt": [[1, 2], [3]]}).prompt == [[1, 2], [3]]
    assert refused({"prompt": [[1, 2], "a"]}).param == "prompt"
    assert refused({"prompt": [True, 2]}).param == "prompt"  # a bool is not a token id
    chat = parse({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 3?"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "5"}]}, chat=True)
    text = chat.prompt[0]
    assert "<|system|>\nBe brief." in text and "What is\n2 + 3?" in text and "<|tool|>\n5" in text
    assert text.endswith("<|assistant|>\n")
    e = refused({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, True)
    assert e.param == "messages[0].content[0]" and "'image_url' parts are not supported" in e.message
    assert refused({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]}, True).param == \
        "messages[0].tool_calls"


def test_token_ids_and_logit_bias_ids_must_be_in_the_vocabulary():
    assert check_ids([0, 511], 512, "prompt") == [0, 511]
    for bad in (-1, 512, 10 ** 30):
        with pytest.raises(ApiError, match=r"outside the vocabulary \[0, 512\)"):
            check_ids([1, bad], 512, "prompt")
    assert parse({"prompt": "a", "logit_bias": {"7": 100, "9": -5.5}}).sampling.logit_bias == {7: 100.0, 9: -5.5}
    for bias in ({"x": 1}, {"7": 101}, {"7": True}, {"-1": 1}):
        assert refused({"prompt": "a", "logit_bias": bias}).param == "logit_bias"


def test_sampling_fields_are_used_not_dropped():
    s = parse({"prompt": "a", "top_k": 5, "min_p": 0.1, "presence_penalty": 1.5, "frequency_penalty": -0.5,
               "repetition_penalty": 1.2, "temperature": 0.7, "n": 2, "best_of": 2}).sampling
    assert (s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.n) == \
        (5, 0.1, 1.5, -0.5, 1.2, 2)
    assert parse({"prompt": "a"}).sampling.seed is None  # unseeded: fresh randomness
    assert parse({"prompt": "a", "seed": 3}).sampling.seed == 3
    assert parse({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 7,
                  "max_tokens": 3}, chat=True).sampling.max_tokens == 7
    for field, value in (("top_k", -2), ("min_p", 1.5), ("presence_penalty", 3), ("repetition_penalty", 0)):
        assert refused({"prompt": "a", field: value}).param == field


def test_what_is_not_implemented_is_refused_by_name_and_the_rest_accepted():
    for field, value in (("tools", [{"type": "function"}]), ("response_format", {"type": "json_schema"}),
                         ("response_format", {"type": "json_object"}), ("suffix", "x"), ("tool_choice", "auto"),
                         ("best_of", 3)):
        e = refused({"prompt": "a", field: value})
        assert e.param == field and e.status == 400, (field, e.message)
    ok = parse({"prompt": "a", "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                "user": "u1", "logprobs": None, "echo": False, "metadata": {"k": 1}})
    assert ok.ignored == ("metadata", "user")


def test_stream_options_follow_vllm():
    assert refused({"prompt": "a", "stream_options": {"include_usage": True}}).param == "stream_options"
    assert parse({"prompt": "a", "stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert not parse({"prompt": "a", "stream": True}).include_usage
    assert refused({"prompt": "a", "stream": True, "stream_options": {"include_usage": "yes"}}).param == \
        "stream_options.include_usage"


def test_errors_quote_a_short_prefix_and_huge_numbers_are_a_400():
    e = refused({"prompt": "a", "temperature": "x" * 3_000_000})
    assert len(e.message) < 300 and "3000002 characters" in e.message
    e = refused({"prompt": {"k": "y" * 100_000}})
    assert len(e.message) < 400
    with pytest.raises(ApiError) as e:
        parse_json(b'{"model": "m", "prompt": "a", "n": ' + b"9" * 5000 + b"}", ServeLimits())
    assert e.value.status == 400 and "number too long" in e.value.message


def test_a_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing():
    check_chars("x" * 100, context=10, max_token_chars=10, param="prompt")
    with pytest.raises(ApiError) as e:
        check_chars("x" * 101, context=10, max_token_chars=10, param="prompt")
    assert e.value.code == "context_length_exceeded"


def test_penalties_bias_top_k_and_min_p_in_the_transformers_engine():
    """vLLM's meanings: logit_bias added; repetition divides positive and multiplies negative logits
    of tokens in the prompt or output; frequency per occurrence and presence once, output only."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    prompt, output = torch.tensor([[0, -1]]), torch.tensor([[1, 1, 2]])
    got = penalized(logits, Sampling(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0,
                                     logit_bias={3: 10.0}), prompt, output)
    want = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 * 2 - 1.0, 0.5 / 2 - 0.5 - 1.0, 10.0]])
    torch.testing.assert_close(got, want)
    greedy = Sampling(temperature=0.0, logit_bias={3: 100.0})
    assert next_tokens(logits, greedy, None).item() == 3
    gen = generator(0, "cpu")
    wide = torch.zeros(1, 50)
    wide[0, :3] = torch.tensor([5.0, 4.9, 4.8])
    picks = {next_tokens(wide, Sampling(temperature=1.0, top_k=2), gen).item() for _ in range(200)}
    assert picks == {0, 1}
    picks = {next_tokens(wide, Sampling(temperature=1.0, min_p=0.5), gen).item() for _ in range(200)}
    assert picks == {0, 1, 2}
    a, b = (next_tokens(torch.zeros(1, 1000), Sampling(temperature=1.0), generator(None, "cpu")).item()
            for _ in range(2))
    c = [next_tokens(torch.zeros(1, 1000), Sampling(temperature=1.0), generator(None, "cpu")).item()
         for _ in range(5)]
    assert len({a, b, *c}) > 1  # unseeded streams differ


def test_logprobs_and_echo_follow_the_openai_api():
    assert parse({"prompt": "a", "logprobs": 3}).sampling.logprobs == 3
    assert parse({"prompt": "a", "logprobs": 0}).sampling.logprobs == 0
    assert parse({"prompt": "a"}).sampling.logprobs is None
    echo = parse({"prompt": "a", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert echo.echo and echo.sampling.max_tokens == 0
    assert refused({"prompt": "a", "max_tokens": 0}).param == "max_tokens"  # 0 only with echo
    assert refused({"prompt": "a", "logprobs": 21}).param == "logprobs"
    msgs = {"messages": [{"role": "user", "content": "a"}]}
    assert parse({**msgs, "logprobs": True, "top_logprobs": 2}, chat=True).sampling.logprobs == 2
    assert parse({**msgs, "logprobs": True}, chat=True).sampling.logprobs == 0
    assert parse(msgs, chat=True).sampling.logprobs is None
    assert refused({**msgs, "top_logprobs": 2}, chat=True).param == "top_logprobs"
    assert refused({**msgs, "logprobs": 2}, chat=True).param == "logprobs"  # chat: a boolean
    assert refused({**msgs, "echo": True}, chat=True).param == "echo"


def test_the_transformers_backend_gives_the_models_own_logprobs():
    """Generated tokens' entries are log_softmax of the model's logits at their position (its own
    distribution, before sampling controls), with the top ones sorted; echo's prompt entries
    are each prompt token's given the tokens before it. The response shapes follow the API."""
    import asyncio
    from laten_ray.generate.hf import HFEngine
    from laten_ray.serve.openai import logprobs_body
    backend = HFEngine("tiny:demo-source")
    ids = backend.encode("<|user|>\nWhat is 2 + 3?\n\n<|assistant|>\n")

    async def run():
        got = [item async for item in backend.stream(ids, Sampling(max_tokens=5, temperature=0, logprobs=3))]
        return got, await backend.prompt_logprobs(ids, 2)
    items, prompt = asyncio.run(run())
    entries = [e for item in items for e in item[4]]
    tokens = [t for t, _, _ in entries]
    assert len(entries) == items[-1][3] == 5
    with torch.no_grad():
        logp = backend.model(torch.tensor([ids + tokens])).logits[0].float().log_softmax(-1)  # [T, V]
    for t, (token, lp, top) in enumerate(entries):
        row = logp[len(ids) - 1 + t]
        assert abs(lp - row[token].item()) < 1e-4 and token == int(row.argmax())  # greedy: the top one
        assert [i for i, _ in top] == row.topk(3).indices.tolist() and len(top) == 3
    assert prompt[0] == (ids[0], None, [])
    for t in range(1, len(ids)):
        assert abs(prompt[t][1] - logp[t - 1, ids[t]].item()) < 1e-4 and len(prompt[t][2]) == 2
    text = lambda i: backend.tokenizer.decode([i])  # noqa: E731
    legacy = logprobs_body(False, prompt[:3], text)
    assert legacy["token_logprobs"][0] is None and legacy["top_logprobs"][0] is None
    assert legacy["text_offset"] == [0, len(text(ids[0])), len(text(ids[0])) + len(text(ids[1]))]
    chat = logprobs_body(True, entries[:1], text)["content"][0]
    assert chat["token"] == text(tokens[0]) and chat["bytes"] == list(text(tokens[0]).encode())
    assert len(chat["top_logprobs"]) == 3
