"""The OpenAI API behind `laten serve`, without Ray: request checking and the response /
stream chunk shapes of /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..data import chat_prompt
from ..eval.engines import GREEDY_BELOW, Sampling

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

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


def _over(limit: str, what: str, value: int | str, most: int, param: str | None, status: int = 400) -> ApiError:
    """A request over one of the limits, named with its `laten serve` flag."""
    flag = "--limit-" + limit.replace("_", "-")
    return ApiError(status, f"{what}: {value}, over this server's limit of {most} (limit {limit}; laten serve {flag})",
                    param, "limit_exceeded" if status == 400 else "request_too_large")


def body_too_large(size: int, limits: ServeLimits, at_least: bool = False) -> ApiError:
    what = "request body bytes (read so far)" if at_least else "request body bytes"
    return _over("body_bytes", what, size, limits.body_bytes, None, 413)


def parse_json(raw: bytes, limits: ServeLimits):
    """The JSON body, or ApiError: not JSON, not UTF-8, or nested deeper than the limit."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # deeper than Python's parser goes: certainly over the limit
        raise _over("json_depth", "JSON nesting depth", "too deep to parse", limits.json_depth, None) from None
    depth, level = 0, [body]  # breadth-first, one level at a time: no recursion
    while level:
        depth += 1
        if depth > limits.json_depth:
            raise _over("json_depth", "JSON nesting depth", depth, limits.json_depth, None)
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
                 if isinstance(c, (dict, list))]
    return body


@dataclass
class Request:
    chat: bool
    prompt: list[str]     # one text per prompt (chat: the rendered conversation)
    sampling: Sampling
    stream: bool


def _typed(body: dict, key: str, kinds, default, check=None, what: str = ""):
    value = body.get(key)
    if value is None:  # absent or null: the default
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"'{key}' must be {what}, got {value!r}", key)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{key}' must be {what}, got {value!r}", key)
    if check is not None and not check(value):
        raise ApiError(400, f"'{key}' must be {what}, got {value!r}", key)
    return value


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
        raise ApiError(404, f"model {model[:200]!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        if len(messages) > limits.messages:
            raise _over("messages", "messages", len(messages), limits.messages, "messages")
        chars = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}",
                               f"messages[{i}]")
            chars += len(m["content"])
            if chars > limits.prompt_chars:
                raise _over("prompt_chars", "characters in the messages", chars, limits.prompt_chars, "messages")
            _text(m["content"], f"messages[{i}].content")
        prompts = [chat_prompt([*messages, {"role": "assistant", "content": ""}])]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, f"'prompt' must be a string or a non-empty list of strings, got {str(prompt)[:200]}",
                           "prompt")
        if len(prompts) > limits.prompts:
            raise _over("prompts", "prompts", len(prompts), limits.prompts, "prompt")
        for p in prompts:
            if len(p) > limits.prompt_chars:
                raise _over("prompt_chars", "characters in a prompt", len(p), limits.prompt_chars, "prompt")
            _text(p, "prompt")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of strings, got {str(stop)[:200]}", "stop")
    stop = stop or []
    if len(stop) > limits.stop:
        raise _over("stop", "stop strings", len(stop), limits.stop, "stop")
    for s in stop:
        if not s:
            raise ApiError(400, "'stop' strings must not be empty", "stop")
        if len(s) > limits.stop_chars:
            raise _over("stop_chars", "characters in a stop string", len(s), limits.stop_chars, "stop")
        _text(s, "stop")
    number = (int, float)
    max_tokens = _typed(body, "max_tokens", int, None if chat else min(16, limits.max_tokens), lambda v: v >= 1,
                        "a positive integer")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise _over("max_tokens", "max_tokens", max_tokens, limits.max_tokens, "max_tokens")
    n = _typed(body, "n", int, 1, lambda v: v >= 1, "a positive integer")
    if n > limits.n:
        raise _over("n", "n", n, limits.n, "n")
    temperature = float(_typed(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"))
    sampling = Sampling(
        max_tokens=max_tokens or 0,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,  # 1e-300 would overflow: greedy
        top_p=float(_typed(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        n=n,
        stop=stop,
        seed=_typed(body, "seed", int, 0, lambda v: -(1 << 63) <= v < 1 << 64, "an integer of at most 64 bits"),
        ignore_eos=_typed(body, "ignore_eos", bool, False, None, "a boolean"))  # vLLM's extension
    stream = _typed(body, "stream", bool, False, None, "a boolean")
    return Request(chat, prompts, sampling, stream)


def check_length(prompt_ids: list[int], sampling: Sampling, context: int, most: int | None = None) -> Sampling:
    """Fill in the default max_tokens (chat: the rest of the context, at most `most`) and refuse
    what cannot fit."""
    room = context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}",
                       "messages" if sampling.max_tokens == 0 else "prompt", "context_length_exceeded")
    if sampling.max_tokens == 0:
        sampling.max_tokens = min(room, most or room)
    elif sampling.max_tokens > room:
        raise ApiError(400, f"max_tokens {sampling.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                            f"exceeds the model's context of {context}", "max_tokens", "context_length_exceeded")
    return sampling


# --- responses -------------------------------------------------------------------------------

def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def chunk(req: Request, rid: str, model: str, index: int, delta: str | None, finish: str | None,
          first: bool = False) -> dict:
    if req.chat:
        d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
        choice = {"index": index, "delta": d, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}]}


def full_response(req: Request, rid: str, model: str, texts: dict, finishes: dict, prompt_tokens: int,
                  completion_tokens: int) -> dict:
    choices = []
    for i in sorted(texts):
        if req.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "finish_reason": finishes.get(i) or "stop", "logprobs": None})
        else:
            choices.append({"index": i, "text": texts[i], "finish_reason": finishes.get(i) or "stop",
                            "logprobs": None})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
