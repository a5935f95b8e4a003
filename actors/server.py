"""The serving actor: a Ray Serve deployment (`laten-openai`) with the OpenAI API over HTTP.
Request checks and response shapes are laten_ray/serve/openai.py, the engines
laten_ray/serve/backends.py; this file only wires them to FastAPI on Ray Serve."""
from __future__ import annotations

import json
import time

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from laten_ray.serve.backends import make_backend
from laten_ray.serve.openai import ApiError, check_length, chunk, completion_id, full_response, parse_request

api = FastAPI(title="laten-ray")


@serve.deployment(name="laten-openai", max_ongoing_requests=128)
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, model: str, name: str, engine: str, dtype: str, device: str,
                 max_model_len: int | None):
        import torch
        torch.set_num_threads(1)
        kw = {"max_model_len": max_model_len} if max_model_len else {}
        self.backend = make_backend(model, engine, dtype, device, **kw)
        self.name = name
        self.created = int(time.time())

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "laten-ray", "max_model_len": self.backend.context}]}

    @api.post("/v1/completions")
    async def completions(self, request: HttpRequest):
        return await self.answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: HttpRequest):
        return await self.answer(request, chat=True)

    async def answer(self, request: HttpRequest, chat: bool):
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            req = parse_request(body, chat, self.name)
            prompts = [self.backend.encode(p) for p in req.prompt]
            for ids in prompts:  # every prompt checked before anything is generated
                check_length(ids, req.sampling, self.backend.context)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
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
            return JSONResponse(ApiError(500, f"generation failed: {e}").body(), status_code=500)

    async def events(self, req, rid: str, prompts):
        started = set()
        try:
            for p, ids in enumerate(prompts):
                async for index, delta, finish, _ in self.backend.stream(ids, req.sampling):
                    key = p * req.sampling.n + index
                    yield f"data: {json.dumps(chunk(req, rid, self.name, key, delta, finish, key not in started))}\n\n"
                    started.add(key)
        except Exception as e:  # noqa: BLE001 - reported in the stream, the server stays up
            yield f"data: {json.dumps(ApiError(500, f'generation failed: {e}').body())}\n\n"
        yield "data: [DONE]\n\n"
