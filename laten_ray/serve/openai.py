"""The OpenAI API behind `laten serve`, without Ray: request checking and the response /
stream chunk shapes of /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..data import chat_prompt
from ..eval.engines import Sampling

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


def parse_request(body, chat: bool, model_name: str) -> Request:
    """Check a request body against the OpenAI API; raise ApiError naming the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}",
                               f"messages[{i}]")
        prompts = [chat_prompt([*messages, {"role": "assistant", "content": ""}])]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, f"'prompt' must be a string or a non-empty list of strings, got {prompt!r}",
                           "prompt")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of up to 4 strings, got {stop!r}", "stop")
    number = (int, float)
    sampling = Sampling(
        max_tokens=_typed(body, "max_tokens", int, 16 if not chat else None, lambda v: v >= 1, "a positive integer") or 0,
        temperature=float(_typed(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(_typed(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        n=_typed(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]"),
        stop=stop or [],
        seed=_typed(body, "seed", int, None, None, "an integer") or 0)
    stream = _typed(body, "stream", bool, False, None, "a boolean")
    return Request(chat, prompts, sampling, stream)


def check_length(prompt_ids: list[int], sampling: Sampling, context: int) -> Sampling:
    """Fill in the default max_tokens (chat: the rest of the context) and refuse what cannot fit."""
    room = context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}",
                       "messages" if sampling.max_tokens == 0 else "prompt", "context_length_exceeded")
    if sampling.max_tokens == 0:
        sampling.max_tokens = room
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
