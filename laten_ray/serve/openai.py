"""The OpenAI-compatible API behind `laten serve`, without Ray: request checking, the
generation backends (vLLM's async engine, or transformers one request at a time), and the
response / stream chunk shapes of /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import torch

from .engines import Sampling, next_tokens, use_vllm, vllm_sampling
from .data import chat_prompt

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


# --- backends --------------------------------------------------------------------------------

class HFBackend:
    """transformers, one sequence at a time under a lock (a fallback, not a throughput engine)."""
    name = "hf"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from .models import load_model, load_tokenizer, pick_device
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, dtype, pick_device(device))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.context = min(self.context, max_model_len or self.context)
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def _tokens(self, ids: list[int], s: Sampling, gen) -> Iterator[int]:
        device = self.model.device
        out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        for _ in range(s.max_tokens):
            token = int(next_tokens(out.logits[:, -1].float(), s, gen)[0])
            yield token
            out = self.model(input_ids=torch.tensor([[token]], device=device),
                             past_key_values=out.past_key_values, use_cache=True)

    def _stream_one(self, ids: list[int], s: Sampling, gen) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far); holds back text that may begin
        a stop string or end in half a character."""
        tokens, sent, eos = [], 0, self.tokenizer.eos_token_id
        for token in self._tokens(ids, s, gen):
            if token == eos:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.find(x) for x in s.stop if x in text]
            if hits:
                yield text[sent:min(hits)], "stop", len(tokens)
                return
            safe = len(text) - max([k for x in s.stop for k in range(1, len(x)) if text.endswith(x[:k])] or [0])
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > sent:
                yield text[sent:safe], None, len(tokens)
                sent = safe
        finish = "stop" if len(tokens) < s.max_tokens else "length"
        yield self.tokenizer.decode(tokens, skip_special_tokens=True)[sent:], finish, len(tokens)

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """(choice index, text delta, finish reason, tokens so far) for each of the n samples."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                with self.lock:
                    gen = torch.Generator(device=self.model.device).manual_seed(s.seed)
                    for index in range(s.n):
                        for delta, finish, count in self._stream_one(ids, s, gen):
                            loop.call_soon_threadsafe(queue.put_nowait, (index, delta, finish, count))
            except BaseException as e:  # noqa: BLE001 - handed to the request
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        threading.Thread(target=work, daemon=True).start()
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


class VLLMBackend:
    """vLLM's async engine: continuous batching of concurrent requests."""
    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from .engines import vllm_args
        from .models import load_tokenizer
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**vllm_args(model, dtype, device, max_model_len)))
        self.tokenizer = load_tokenizer(model)  # the same ids the transformers backend would see
        self.context = self.engine.model_config.max_model_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int]]:
        from vllm.inputs import TokensPrompt
        sent: dict[int, int] = {}
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), vllm_sampling(s),
                                              uuid.uuid4().hex):
            for o in out.outputs:  # cumulative text: hand on what is new
                delta = o.text[sent.get(o.index, 0):]
                sent[o.index] = len(o.text)
                if delta or o.finish_reason:
                    yield o.index, delta, o.finish_reason, len(o.token_ids)


def make_backend(model: str, engine: str = "auto", dtype: str = "float32", device: str = "auto", **kw):
    if use_vllm(engine):
        return VLLMBackend(model, dtype, device, **kw)
    return HFBackend(model, dtype, device, kw.get("max_model_len"))


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
