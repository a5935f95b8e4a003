"""The OpenAI API behind `laten serve`, without Ray: request checking and the response /
stream chunk shapes of /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..data import chat_prompt
from ..generate.sampling import GREEDY_BELOW, Sampling

ROLES = ("system", "developer", "user", "assistant", "tool")
# Rendered in laten's chat format as the role the model was trained on: OpenAI's `developer` is
# its newer name for `system`; a tool's result is shown under its own tag.
RENDER_ROLE = {"developer": "system"}
QUOTE = 80  # characters of an offending value an error message quotes
MAX_LOGPROBS = 20  # top log-probabilities per token, as vLLM's default max_logprobs
# Fields whose behaviour this server does not implement: refused, naming the field, rather than
# ignored. (value -> whether it is harmless, e.g. tool_choice "none".) Other unknown fields change
# nothing here and are accepted and logged, as vLLM's server does.
NOT_IMPLEMENTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in ("none",),
    "function_call": lambda v: v in ("none",), "suffix": lambda v: not v, "audio": lambda v: not v,
    "prediction": lambda v: not v, "web_search_options": lambda v: not v,
    "modalities": lambda v: v in (["text"],), "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
    "guided_json": lambda v: not v, "guided_regex": lambda v: not v, "guided_choice": lambda v: not v,
    "guided_grammar": lambda v: not v, "structured_outputs": lambda v: not v,
}
KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p",
         "top_k", "min_p", "stop", "seed", "stream", "stream_options", "presence_penalty", "frequency_penalty",
         "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "echo", "best_of", "ignore_eos",
         *NOT_IMPLEMENTED}


def quote(value) -> str:
    """An offending value as an error message shows it: its repr, cut to a short prefix."""
    text = repr(value)
    return text if len(text) <= QUOTE else f"{text[:QUOTE]}... ({len(text)} characters)"


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ServeLimits:
    """What one request may ask for. Each is checked on the raw request, before any tokenization
    or model work, so an oversized request costs the server almost nothing; each is a
    `laten serve --limit-*` flag and a key of the Serve config's `limits`."""
    body_bytes: int = 4 << 20      # the HTTP body (413 above it)
    prompt_chars: int = 200_000    # one prompt, or one chat's messages together
    prompts: int = 64              # prompts in one completions request
    messages: int = 256            # messages in one chat request
    stop: int = 4                  # stop strings
    stop_chars: int = 1024         # characters of one stop string
    n: int = 16                    # samples per prompt
    max_tokens: int = 4096         # new tokens per sample (the model's context may allow fewer)
    json_depth: int = 32           # nesting of the JSON body
    queued: int = 256              # requests waiting for the transformers engine (429 above it)
    body_seconds: int = 10         # to send the whole body (408 after): a slow upload cannot hold a slot
    unfinished: int = 32           # requests still sending their body at once (503 above it)

    @classmethod
    def from_dict(cls, values: dict | None) -> ServeLimits:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"limits: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{key} must be a positive integer, got {value!r}")
        return cls(**values)


def over_limit(limit: str, what: str, value: int | str, most: int, param: str | None, status: int = 400) -> ApiError:
    """A request over one of the limits, named with its `laten serve` flag."""
    flag = "--limit-" + limit.replace("_", "-")
    return ApiError(status, f"{what}: {value}, over this server's limit of {most} (limit {limit}; laten serve {flag})",
                    param, "limit_exceeded" if status == 400 else "request_too_large")


def body_too_large(size: int, limits: ServeLimits, at_least: bool = False) -> ApiError:
    what = "request body bytes (read so far)" if at_least else "request body bytes"
    return over_limit("body_bytes", what, size, limits.body_bytes, None, 413)


def parse_json(raw: bytes, limits: ServeLimits):
    """The JSON body, or ApiError: not JSON, not UTF-8, or nested deeper than the limit."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:200]})") from None
    except ValueError as e:  # an integer literal longer than Python converts (4300 digits)
        raise ApiError(400, f"the request body has a number too long to read ({str(e)[:120]})") from None
    except RecursionError:  # deeper than Python's parser goes: certainly over the limit
        raise over_limit("json_depth", "JSON nesting depth", "too deep to parse", limits.json_depth, None) from None
    depth, level = 0, [body]  # breadth-first, one level at a time: no recursion
    while level:
        depth += 1
        if depth > limits.json_depth:
            raise over_limit("json_depth", "JSON nesting depth", depth, limits.json_depth, None)
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
                 if isinstance(c, (dict, list))]
    return body


@dataclass
class Request:
    chat: bool
    prompt: list[str | list[int]]  # per prompt its text (chat: the rendered conversation) or token ids
    sampling: Sampling
    stream: bool
    include_usage: bool = False    # stream_options.include_usage: a last chunk with the usage
    ignored: tuple = ()            # fields accepted that change nothing here (logged)
    echo: bool = False             # completions: the prompt before the completion (and its log-probs)


def _typed(body: dict, key: str, kinds, default, check=None, what: str = ""):
    value = body.get(key)
    if value is None:  # absent or null: the default
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"'{key}' must be {what}, got {quote(value)}", key)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{key}' must be {what}, got {quote(value)}", key)
    if check is not None and not check(value):
        raise ApiError(400, f"'{key}' must be {what}, got {quote(value)}", key)
    return value


def _content(m: dict, i: int) -> str:
    """A message's text: a string, or a list of text parts (the OpenAI API's content parts)."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None and m.get("role") == "assistant":
        return ""
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise ApiError(400, f"messages[{i}].content[{j}] must be a text part {{type: text, text: string}}"
                                    + (f"; {quote(kind)} parts are not supported" if kind else ""),
                               f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a non-empty list of text parts",
                   f"messages[{i}].content")


def _token_prompts(prompt) -> list[list[int]] | None:
    """Token-id prompts ([1, 2, 3] or [[1, 2], [3]]) as lists, or None if `prompt` is not one."""
    ints = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)  # noqa: E731
    if ints(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(ints(p) for p in prompt):
        return prompt
    return None


def check_ids(ids: list[int], vocab: int, param: str) -> list[int]:
    """Token ids a model can take: each in [0, vocab)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"'{param}' has token id {quote(bad)}, outside the vocabulary [0, {vocab})", param)
    return ids


def _text(value: str, param: str) -> str:
    """A string the tokenizer can take: JSON allows lone surrogates (\\ud800), UTF-8 does not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{param}' is not valid Unicode: a lone surrogate at character {e.start}",
                       param, "invalid_unicode") from None
    return value


def parse_request(body, chat: bool, model_name: str, limits: ServeLimits | None = None) -> Request:
    """Check a request body against the OpenAI API and the server's limits; raise ApiError
    naming the bad field or the limit. Sizes are checked before anything is rendered."""
    limits = limits or ServeLimits()
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != model_name:
        raise ApiError(404, f"model {quote(model)} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        if len(messages) > limits.messages:
            raise over_limit("messages", "messages", len(messages), limits.messages, "messages")
        chars, turns = 0, []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: ...}}",
                               f"messages[{i}]")
            if m.get("tool_calls"):
                raise ApiError(400, f"messages[{i}].tool_calls: tool calls are not supported by this server",
                               f"messages[{i}].tool_calls")
            text = _content(m, i)
            chars += len(text)
            if chars > limits.prompt_chars:
                raise over_limit("prompt_chars", "characters in the messages", chars, limits.prompt_chars, "messages")
            _text(text, f"messages[{i}].content")
            turns.append({"role": RENDER_ROLE.get(m["role"], m["role"]), "content": text})
        prompts = [chat_prompt([*turns, {"role": "assistant", "content": ""}])]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif (ids := _token_prompts(prompt)) is not None:
            prompts = ids
        else:
            raise ApiError(400, "'prompt' must be a string, a non-empty list of strings, a list of token ids "
                                f"or a list of lists of token ids, got {quote(prompt)}", "prompt")
        if len(prompts) > limits.prompts:
            raise over_limit("prompts", "prompts", len(prompts), limits.prompts, "prompt")
        for p in prompts:
            if len(p) > limits.prompt_chars:
                what = "characters in a prompt" if isinstance(p, str) else "token ids in a prompt"
                raise over_limit("prompt_chars", what, len(p), limits.prompt_chars, "prompt")
            if isinstance(p, str):
                _text(p, "prompt")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of strings, got {quote(stop)}", "stop")
    stop = stop or []
    if len(stop) > limits.stop:
        raise over_limit("stop", "stop strings", len(stop), limits.stop, "stop")
    for s in stop:
        if not s:
            raise ApiError(400, "'stop' strings must not be empty", "stop")
        if len(s) > limits.stop_chars:
            raise over_limit("stop_chars", "characters in a stop string", len(s), limits.stop_chars, "stop")
        _text(s, "stop")
    for key, harmless in NOT_IMPLEMENTED.items():
        if key in body and body[key] is not None and not harmless(body[key]):
            raise ApiError(400, f"'{key}' is not supported by this server (got {quote(body[key])})", key,
                           "unsupported_parameter")
    number = (int, float)
    positive = lambda v: v >= 1  # noqa: E731
    # max_completion_tokens is the chat API's newer name; it wins over max_tokens, as in vLLM
    max_tokens = _typed(body, "max_completion_tokens", int, None, positive, "a positive integer")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    if max_tokens is None:  # 0 only with echo (checked below): the prompt's log-probs alone
        max_tokens = _typed(body, "max_tokens", int, None if chat else min(16, limits.max_tokens),
                            lambda v: v >= 0, "a positive integer")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise over_limit("max_tokens", key, max_tokens, limits.max_tokens, key)
    n = _typed(body, "n", int, 1, positive, "a positive integer")
    if n > limits.n:
        raise over_limit("n", "n", n, limits.n, "n")
    best_of = _typed(body, "best_of", int, n, positive, "a positive integer")
    if best_of != n:
        raise ApiError(400, f"'best_of' {best_of} other than n ({n}) is not supported by this server", "best_of",
                       "unsupported_parameter")
    temperature = float(_typed(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"))
    bias = _typed(body, "logit_bias", dict, {}, None, "an object of token id -> bias")
    logit_bias = {}
    for token, value in bias.items():
        if not (token.isdigit() and len(token) < 12) or isinstance(value, bool) or not isinstance(value, number) \
                or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' maps token ids to numbers in [-100, 100], got {quote(token)}: "
                                f"{quote(value)}", "logit_bias")
        logit_bias[int(token)] = float(value)
    sampling = Sampling(
        max_tokens=max_tokens or 0,  # chat without max_tokens: 0 here, the rest of the context (check_length)
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,  # 1e-300 would overflow: greedy
        top_p=float(_typed(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        n=n,
        stop=stop,
        seed=_typed(body, "seed", int, None, lambda v: -(1 << 63) <= v < 1 << 64, "an integer of at most 64 bits"),
        ignore_eos=_typed(body, "ignore_eos", bool, False, None, "a boolean"),  # vLLM's extension
        top_k=_typed(body, "top_k", int, 0, lambda v: v >= -1, "-1, 0 (all tokens) or a positive integer"),
        min_p=float(_typed(body, "min_p", number, 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")),
        presence_penalty=float(_typed(body, "presence_penalty", number, 0.0, lambda v: -2 <= v <= 2,
                                      "a number in [-2, 2]")),
        frequency_penalty=float(_typed(body, "frequency_penalty", number, 0.0, lambda v: -2 <= v <= 2,
                                       "a number in [-2, 2]")),
        repetition_penalty=float(_typed(body, "repetition_penalty", number, 1.0, lambda v: 0 < v <= 2,
                                        "a number in (0, 2]")),
        logit_bias=logit_bias)
    top = lambda v: 0 <= v <= MAX_LOGPROBS  # noqa: E731
    if chat:  # logprobs: true, and top_logprobs: how many of the likeliest tokens besides
        if _typed(body, "echo", bool, False, None, "a boolean"):
            raise ApiError(400, "'echo' is a completions field; chat has no prompt text to echo", "echo")
        wanted = _typed(body, "logprobs", bool, False, None, "a boolean")
        k = _typed(body, "top_logprobs", int, None, top, f"an integer in [0, {MAX_LOGPROBS}]")
        if k is not None and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        sampling.logprobs = (k or 0) if wanted else None
        echo = False
    else:  # logprobs: how many of the likeliest tokens per position; echo: the prompt's too
        sampling.logprobs = _typed(body, "logprobs", int, None, top, f"an integer in [0, {MAX_LOGPROBS}]")
        echo = _typed(body, "echo", bool, False, None, "a boolean")
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' must be a positive integer (0 only with echo)", key)
    stream = _typed(body, "stream", bool, False, None, "a boolean")
    options = _typed(body, "stream_options", dict, None, None, "an object")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' can only be set if 'stream' is true", "stream_options")
    include_usage = (options or {}).get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be a boolean, got {quote(include_usage)}",
                       "stream_options.include_usage")
    ignored = tuple(sorted(k for k in body if k not in KNOWN))
    return Request(chat, prompts, sampling, stream, include_usage, ignored, echo)


def check_chars(text: str, context: int, max_token_chars: int, param: str) -> None:
    """Refuse, before tokenizing it, a text longer than `context` tokens of the vocabulary's
    longest token could spell: it certainly exceeds the context."""
    if len(text) > context * max_token_chars:
        raise ApiError(400, f"the prompt has {len(text)} characters, more than the model's context of {context} "
                            f"tokens can hold (at most {max_token_chars} characters per token)", param,
                       "context_length_exceeded")


def check_length(prompt_ids: list[int], sampling: Sampling, context: int, most: int | None = None,
                 chat: bool = False) -> Sampling:
    """Fill in a chat's default max_tokens (the rest of the context, at most `most`) and refuse
    what cannot fit. (A completion's max_tokens 0 means echo alone: nothing generated.)"""
    room = context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    if sampling.max_tokens == 0 and chat:
        sampling.max_tokens = min(room, most or room)
    elif sampling.max_tokens > room:
        raise ApiError(400, f"max_tokens {sampling.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                            f"exceeds the model's context of {context}", "max_tokens", "context_length_exceeded")
    return sampling


# --- responses -------------------------------------------------------------------------------

def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def logprobs_body(chat: bool, entries: list, token_text, offset: int = 0) -> dict:
    """Log-prob entries (backends.Entry: token, its log-prob or None, the top ones) in the OpenAI
    shape: chat's `content` list, or completions' parallel lists with each token's character
    offset in the choice's text from `offset`."""
    def top_chat(top):
        return [{"token": (t := token_text(i)), "logprob": lp, "bytes": list(t.encode())} for i, lp in top]
    if chat:
        return {"content": [{"token": (t := token_text(token)), "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": top_chat(top)} for token, lp, top in entries]}
    tokens = [token_text(token) for token, _, _ in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {token_text(i): v for i, v in top} for _, lp, top in entries],
            "text_offset": offsets}


def chunk(req: Request, rid: str, model: str, index: int, delta: str | None, finish: str | None,
          first: bool = False, logprobs: dict | None = None) -> dict:
    if req.chat:
        d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": index, "delta": d, "finish_reason": finish, "logprobs": logprobs}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_chunk(req: Request, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The stream's last chunk when stream_options.include_usage asks: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def full_response(req: Request, rid: str, model: str, texts: dict, finishes: dict, prompt_tokens: int,
                  completion_tokens: int, logprobs: dict | None = None) -> dict:
    choices, logprobs = [], logprobs or {}
    for i in sorted(texts):
        if req.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "finish_reason": finishes.get(i) or "stop", "logprobs": logprobs.get(i)})
        else:
            choices.append({"index": i, "text": texts[i], "finish_reason": finishes.get(i) or "stop",
                            "logprobs": logprobs.get(i)})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}
