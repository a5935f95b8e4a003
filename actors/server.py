"""The serving actor: a Ray Serve deployment (`laten-openai`) with the OpenAI API over HTTP.
Request checks and response shapes are laten_ray/serve/openai.py, the engines
laten_ray/serve/backends.py; this file only wires them to FastAPI on Ray Serve.

Hardening: the body is read up to its limit and every other limit is checked before any
tokenization; JSON parsing and tokenization run on a worker thread, off the event loop that
answers everyone else; a client that disconnects cancels its request, and the backends stop
its generation; the health check fails when the engine is dead or stuck, so Ray Serve replaces
the replica, and until then generation answers 503, not 500."""
# No `from __future__ import annotations` here: FastAPI 0.137+ under Ray Serve's class-based ingress
# does not resolve a string annotation (`request: HttpRequest`) and takes the parameter for a query field.

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from laten_ray.serve.backends import engine_dead, start_backend
from laten_ray.serve.openai import (ApiError, ServeLimits, body_too_large, check_length, chunk, completion_id,
                                    full_response, parse_json, parse_request)

api = FastAPI(title="laten-ray")


def reply(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


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
        self.backend = await start_backend(model, engine, dtype, device, max_model_len)
        self.name = name
        self.created = int(time.time())
        # JSON parsing and tokenization: one thread (the tokenizer is not safe to share across threads)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="laten-requests")

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
        """Ray Serve's health check: raising marks the replica unhealthy and replaces it."""
        if (problem := self.problem()) is not None:
            raise RuntimeError(problem)

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

    @api.post("/v1/completions")
    async def completions(self, request: HttpRequest):
        return await self.answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest):
        return await self.answer(request, chat=True)

    async def read_body(self, request: HttpRequest) -> bytes:
        """The body, refused as soon as it is known to be over the limit (declared or read)."""
        limit = self.limits.body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise body_too_large(int(declared), self.limits)
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise body_too_large(size, self.limits, at_least=True)
            chunks.append(piece)
        return b"".join(chunks)

    def prepare(self, raw: bytes, chat: bool):
        """On the worker thread: parse, check, render and tokenize; ApiError on a bad request."""
        req = parse_request(parse_json(raw, self.limits), chat, self.name, self.limits)
        prompts = [self.backend.encode(p) for p in req.prompt]
        for ids in prompts:  # every prompt checked before anything is generated
            check_length(ids, req.sampling, self.backend.context, self.limits.max_tokens)
        return req, prompts

    async def answer(self, request: HttpRequest, chat: bool):
        try:
            raw = await self.read_body(request)
            if (down := self.unavailable()) is not None:
                return down
            req, prompts = await asyncio.get_running_loop().run_in_executor(self.worker, self.prepare, raw, chat)
        except ApiError as e:
            return reply(e)
        rid = completion_id(chat)
        if req.stream:
            return StreamingResponse(self.events(req, rid, prompts), media_type="text/event-stream")
        try:
            texts, finishes, generated = {}, {}, 0
            for p, ids in enumerate(prompts):
                counts = {}
                async for index, delta, finish, count in self.backend.stream(ids, req.sampling):
                    key = p * req.sampling.n + index
                    texts[key] = texts.get(key, "") + delta
                    finishes[key] = finish or finishes.get(key)
                    counts[index] = count
                generated += sum(counts.values())
            return full_response(req, rid, self.name, texts, finishes, sum(map(len, prompts)), generated)
        except Exception as e:  # noqa: BLE001 - the server must stay up
            return reply(self.failure(e))

    def failure(self, e: Exception) -> ApiError:
        if engine_dead(e):
            return ApiError(503, f"the {self.backend.name} engine died; Ray Serve is replacing this replica",
                            code="engine_unavailable")
        return ApiError(500, f"generation failed: {e}")

    async def events(self, req, rid: str, prompts):
        started = set()
        try:
            for p, ids in enumerate(prompts):
                async for index, delta, finish, _ in self.backend.stream(ids, req.sampling):
                    key = p * req.sampling.n + index
                    yield f"data: {json.dumps(chunk(req, rid, self.name, key, delta, finish, key not in started))}\n\n"
                    started.add(key)
        except Exception as e:  # noqa: BLE001 - reported in the stream, the server stays up
            yield f"data: {json.dumps(self.failure(e).body())}\n\n"
        yield "data: [DONE]\n\n"
