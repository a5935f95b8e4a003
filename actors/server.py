"""The serving actor: a Ray Serve deployment (`laten-openai`) with the OpenAI API over HTTP.
Request checks and response shapes are laten_ray/serve/openai.py, the engines the one
generation layer (laten_ray/generate/); this file only wires them to FastAPI on Ray Serve.

Hardening: only JSON bodies are read, up to their limit and deadline, and every other limit is
checked before any tokenization; JSON parsing and tokenization run on a bounded pool of threads,
off the event loop that answers everyone else; a client that disconnects cancels its request, and the backends stop
its generation; the health check fails when the engine is dead or stuck, so Ray Serve replaces
the replica, and until then generation answers 503, not 500."""
# No `from __future__ import annotations` here: FastAPI 0.137+ under Ray Serve's class-based ingress
# does not resolve a string annotation (`request: HttpRequest`) and takes the parameter for a query field.

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from laten_ray.generate.start import start_stream
from laten_ray.generate.vllm import engine_dead
from laten_ray.serve.openai import (ApiError, ServeLimits, body_too_large, check_chars, check_ids, check_length,
                                    chunk, completion_id, full_response, logprobs_body, over_limit, parse_json,
                                    parse_request, quote, usage_chunk)

api = FastAPI(title="laten-ray")
log = logging.getLogger("ray.serve")


def reply(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(StarletteHTTPException)
async def http_error(request, e: StarletteHTTPException) -> JSONResponse:
    """404 (no such path), 405 (wrong method) and the like, in the OpenAI error shape too."""
    message = {404: f"no route {request.url.path[:100]}; this server has /health, /v1/models, "
                    "/v1/completions, /v1/chat/completions, /tokenize, /detokenize and /tokenizer_info",
               405: f"method {request.method} is not allowed on {request.url.path[:100]}"}.get(e.status_code, str(e.detail))
    error = ApiError(e.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code))
    error.headers = dict(e.headers or {})
    return reply(error)


# One failed start is final (a model the engine cannot run fails `laten serve` in one try);
# health is checked every 5 s.
@serve.deployment(name="laten-openai", max_ongoing_requests=128, health_check_period_s=5,
                  health_check_timeout_s=30, max_constructor_retry_count=1)
@serve.ingress(api)
class OpenAIServer:
    async def __init__(self, model: str, name: str, engine: str, dtype: str, device: str,
                       max_model_len: int | None, limits: dict | None = None, stuck_after_s: float = 120.0):
        import torch
        torch.set_num_threads(1)
        self.limits = ServeLimits.from_dict(limits)
        self.stuck_after_s = stuck_after_s
        self.backend = await start_stream(model, engine, dtype, device, max_model_len, say=log.warning)
        self.name = name
        self.created = int(time.time())
        # JSON parsing and tokenization: a bounded pool, each thread with its own tokenizer
        # (Backend.encode), so one heavy request does not hold up the others
        self.worker = ThreadPoolExecutor(4, thread_name_prefix="laten-requests")
        self.slow = 0  # requests whose bodies are still arriving after a second

    def describe(self) -> dict:
        """What `laten serve` prints once deployed."""
        return {"engine": self.backend.name, "fallback": self.backend.fallback, "context": self.backend.context}

    def problem(self) -> str | None:
        """Why this replica cannot serve, or None."""
        if self.backend.dead:
            return f"the {self.backend.name} engine is dead; Ray Serve is replacing this replica"
        stalled = self.backend.progress.stalled_s()
        if stalled > self.stuck_after_s:
            return (f"the {self.backend.name} engine is stuck: no token for {stalled:.0f} s with "
                    f"{self.backend.progress.running} request(s) running (stuck_after_s {self.stuck_after_s:g})")
        return None

    async def check_health(self) -> None:
        """Ray Serve's health check: raising marks the replica unhealthy and replaces it. It also
        fails when the request pool cannot take a no-op within 10 s: the server cannot accept work."""
        if (problem := self.problem()) is not None:
            raise RuntimeError(problem)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.worker, int), 10)
        except TimeoutError:
            raise RuntimeError("the request pool took no work for 10 s: this replica cannot accept requests") from None

    def unavailable(self) -> JSONResponse | None:
        problem = self.problem()
        return None if problem is None else reply(ApiError(503, problem, code="engine_unavailable"))

    @api.get("/health")
    async def health(self):
        if (down := self.unavailable()) is not None:
            return down
        p = self.backend.progress
        return {"status": "ok", "engine": self.backend.name, "running": p.running, "generated_tokens": p.tokens}

    @api.get("/v1/models")
    async def models(self):
        if (down := self.unavailable()) is not None:
            return down
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "laten-ray", "max_model_len": self.backend.context,
                                            "engine": self.backend.name}]}

    @api.get("/tokenizer_info")
    async def tokenizer_info(self):
        """vLLM's tokenizer endpoints (lm-evaluation-harness's remote tokenizer uses them)."""
        tok = self.backend.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": self.backend.context, "vocab_size": self.backend.vocab}

    @api.post("/tokenize")
    async def tokenize(self, request: HttpRequest):
        return await self.tokens(request, self.prepare_tokenize)

    @api.post("/detokenize")
    async def detokenize(self, request: HttpRequest):
        return await self.tokens(request, self.prepare_detokenize)

    async def tokens(self, request: HttpRequest, work):
        try:
            raw = await self.read_json_body(request)
            return await asyncio.get_running_loop().run_in_executor(self.worker, work, raw)
        except ApiError as e:
            return reply(e)

    def prepare_tokenize(self, raw: bytes) -> dict:
        """/tokenize {prompt, add_special_tokens} or {messages}: the ids, as vLLM answers."""
        body = parse_json(raw, self.limits)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if "messages" in body:  # rendered as the chat endpoint renders them
            req = parse_request({**body, "model": self.name, "max_tokens": 1}, True, self.name, self.limits)
            text, special = req.prompt[0], True
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise ApiError(400, f"'prompt' must be a string, got {quote(text)}", "prompt")
            if len(text) > self.limits.prompt_chars:
                raise over_limit("prompt_chars", "characters in a prompt", len(text), self.limits.prompt_chars, "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise ApiError(400, f"'add_special_tokens' must be a boolean, got {quote(special)}",
                               "add_special_tokens")
        ids = self.backend.encode(text, special)
        return {"count": len(ids), "max_model_len": self.backend.context, "tokens": ids, "token_strs": None}

    def prepare_detokenize(self, raw: bytes) -> dict:
        body = parse_json(raw, self.limits)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise ApiError(400, f"'tokens' must be a list of token ids, got {quote(ids)}", "tokens")
        if len(ids) > self.limits.prompt_chars:
            raise over_limit("prompt_chars", "token ids", len(ids), self.limits.prompt_chars, "tokens")
        return {"prompt": self.backend.tokenizer.decode(check_ids(ids, self.backend.vocab, "tokens"))}

    @api.post("/v1/completions")
    async def completions(self, request: HttpRequest):
        return await self.answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest):
        return await self.answer(request, chat=True)

    async def read_body(self, request: HttpRequest) -> bytes:
        """The body, refused as soon as it is known to be over the limit (declared or read), or
        not whole within limits.body_seconds (408). A body still arriving after a second makes
        its request a slow upload, and at most limits.unfinished of those wait at once (503
        beyond): slow or unfinished uploads cannot take every slot of the replica from /health
        and from requests that arrive whole."""
        limit = self.limits.body_bytes
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            # Ray Serve's proxy reads a body into memory as fast as the client sends it, and hands
            # it on in batches of many MB, before this replica can count it (proxy_asgi_receive, an
            # unbounded queue): only a declared length can be refused before anything is read.
            raise ApiError(411, "the request must declare its body's length (a Content-Length header; "
                                "chunked uploads are not accepted)", None, "length_required")
        if int(declared) > limit:
            raise body_too_large(int(declared), self.limits)
        got = {"size": 0}

        async def collect() -> bytes:
            chunks = []
            async for piece in request.stream():
                got["size"] += len(piece)
                if got["size"] > limit:
                    raise body_too_large(got["size"], self.limits, at_least=True)
                chunks.append(piece)
            return b"".join(chunks)

        task = asyncio.ensure_future(collect())
        done, _ = await asyncio.wait({task}, timeout=min(1.0, self.limits.body_seconds))
        if done:
            return task.result()
        if self.slow >= self.limits.unfinished:
            task.cancel()
            raise ApiError(503, f"{self.slow} requests are still sending their bodies (limit unfinished; "
                                "laten serve --limit-unfinished); retry shortly", None, "server_busy",
                           {"Retry-After": "1"})
        self.slow += 1
        try:
            return await asyncio.wait_for(task, max(self.limits.body_seconds - 1.0, 0.001))
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive whole within {self.limits.body_seconds} s "
                                f"({got['size']} bytes came; limit body_seconds; laten serve --limit-body-seconds)",
                           None, "request_timeout") from None
        finally:
            self.slow -= 1

    def prepare(self, raw: bytes, chat: bool):
        """On the worker thread: parse, check, render and tokenize; ApiError on a bad request."""
        req = parse_request(parse_json(raw, self.limits), chat, self.name, self.limits)
        if req.ignored:
            log.info("accepted and ignored (they change nothing here): %s", ", ".join(req.ignored)[:300])
        b, param = self.backend, "messages" if chat else "prompt"
        check_ids(list(req.sampling.logit_bias), b.vocab, "logit_bias")
        for p in req.prompt:  # the cheap checks of every prompt before any is tokenized
            if isinstance(p, str):
                check_chars(p, b.context, b.max_token_chars, param)
        prompts = [b.encode(p) if isinstance(p, str) else check_ids(p, b.vocab, param) for p in req.prompt]
        for ids in prompts:  # every prompt checked before anything is generated
            check_length(ids, req.sampling, b.context, self.limits.max_tokens, chat)
        return req, prompts

    async def read_json_body(self, request: HttpRequest) -> bytes:
        """The body of a JSON request: 415 for any other Content-Type (so a web page's form or
        text/plain post cannot reach the model), 413 over the limit."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {kind[:60]!r}", None,
                           "unsupported_media_type")
        return await self.read_body(request)

    async def answer(self, request: HttpRequest, chat: bool):
        try:
            raw = await self.read_json_body(request)
            if (down := self.unavailable()) is not None:
                return down
            if self.backend.queue_full(self.limits.queued):
                raise ApiError(429, f"{self.limits.queued} requests are already waiting for the {self.backend.name} "
                                    "engine; retry shortly (limit queued; laten serve --limit-queued)", None,
                               "rate_limit_exceeded", {"Retry-After": "1"})
            req, prompts = await asyncio.get_running_loop().run_in_executor(self.worker, self.prepare, raw, chat)
        except ApiError as e:
            return reply(e)
        rid = completion_id(chat)
        if req.stream:
            return StreamingResponse(self.events(req, rid, prompts), media_type="text/event-stream")
        try:
            texts, finishes, entries, generated = {}, {}, {}, 0
            for p, ids in enumerate(prompts):
                prefix, echoed = await self.echo_of(req, p, ids)
                counts = {}
                for index in range(req.sampling.n):
                    key = p * req.sampling.n + index
                    texts[key], entries[key], finishes[key] = prefix, list(echoed), "length"
                async for index, delta, finish, count, new in self.generate(ids, req.sampling):
                    key = p * req.sampling.n + index
                    texts[key] += delta
                    entries[key] += new
                    finishes[key] = finish or finishes[key]
                    counts[index] = count
                generated += sum(counts.values())
            logprobs = {k: self.logprobs(req, e) for k, e in entries.items()} if req.sampling.logprobs is not None \
                else None
            return full_response(req, rid, self.name, texts, finishes, sum(map(len, prompts)), generated, logprobs)
        except Exception as e:  # noqa: BLE001 - the server must stay up
            return reply(self.failure(e))

    def generate(self, ids: list[int], sampling):
        """The engine's stream, or nothing for echo with max_tokens 0 (the prompt alone)."""
        if sampling.max_tokens > 0:
            return self.backend.stream(ids, sampling)
        async def nothing():
            return
            yield
        return nothing()

    async def echo_of(self, req, p: int, ids: list[int]) -> tuple[str, list]:
        """What `echo` puts before prompt p's completions: its text and (with logprobs) its
        tokens' log-prob entries; nothing without echo."""
        if not req.echo:
            return "", []
        text = req.prompt[p] if isinstance(req.prompt[p], str) else self.backend.tokenizer.decode(ids)
        if req.sampling.logprobs is None:
            return text, []
        return text, await self.backend.prompt_logprobs(ids, req.sampling.logprobs)

    def logprobs(self, req, entries: list, offset: int = 0) -> dict:
        """Log-prob entries in the response's shape, tokens as their text (completions: with
        offsets in the choice's text from `offset`)."""
        decode = self.backend.tokenizer.decode
        return logprobs_body(req.chat, entries, lambda token: decode([token]), offset)

    def failure(self, e: Exception) -> ApiError:
        if engine_dead(e):
            return ApiError(503, f"the {self.backend.name} engine died; Ray Serve is replacing this replica",
                            code="engine_unavailable")
        return ApiError(500, f"generation failed: {e}")

    async def events(self, req, rid: str, prompts):
        started, generated, offsets = set(), 0, {}
        wanted = req.sampling.logprobs is not None
        try:
            for p, ids in enumerate(prompts):
                prefix, echoed = await self.echo_of(req, p, ids)
                counts = {}
                for index in range(req.sampling.n if req.echo else 0):  # echo: the prompt first
                    key = p * req.sampling.n + index
                    lp = self.logprobs(req, echoed) if wanted else None
                    alone = "length" if req.sampling.max_tokens == 0 else None  # echo only: nothing follows
                    yield f"data: {json.dumps(chunk(req, rid, self.name, key, prefix, alone, True, lp))}\n\n"
                    started.add(key)
                    offsets[key] = len(prefix)
                async for index, delta, finish, count, new in self.generate(ids, req.sampling):
                    key = p * req.sampling.n + index
                    counts[index] = count
                    lp = None
                    if wanted:
                        lp = self.logprobs(req, new, offsets.get(key, 0))
                        offsets[key] = offsets.get(key, 0) + sum(len(x) for x in lp.get("tokens", ()))
                    yield f"data: {json.dumps(chunk(req, rid, self.name, key, delta, finish, key not in started, lp))}\n\n"
                    started.add(key)
                generated += sum(counts.values())
            if req.include_usage:
                usage = usage_chunk(req, rid, self.name, sum(map(len, prompts)), generated)
                yield f"data: {json.dumps(usage)}\n\n"
        except Exception as e:  # noqa: BLE001 - reported in the stream, the server stays up
            yield f"data: {json.dumps(self.failure(e).body())}\n\n"
        yield "data: [DONE]\n\n"
