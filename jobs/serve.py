"""Serve a model with an OpenAI-compatible HTTP API on Ray Serve:
`python -m jobs.serve --model DIR [--port 8000]` (and `laten serve`).

POST /v1/completions, POST /v1/chat/completions (both with "stream": true too), GET /v1/models.
vLLM's async engine answers when vLLM is installed, transformers otherwise. A bad request
gets a 4xx JSON error naming the problem; the server keeps serving.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from laten_ray.serving import (ApiError, check_length, chunk, completion_id, full_response,
                               make_backend, parse_request)

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


def deploy(model: str, name: str | None = None, engine: str = "auto", dtype: str = "float32",
           device: str = "auto", host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
           num_cpus: float = 1.0, num_gpus: float = 0.0, address: str | None = None) -> str:
    """Start (or join) Ray, deploy the app and return its base URL."""
    import ray
    from laten_ray.models import check_spec
    check_spec(model)  # a missing folder fails here, before Ray starts
    name = name or (model if model.startswith("tiny:") else Path(model).name)
    if not ray.is_initialized():
        ray.init(address=address, namespace="laten-serve", log_to_driver=True)
    serve.start(http_options={"host": host, "port": port})
    app = OpenAIServer.options(ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}).bind(
        model, name, engine, dtype, device, max_model_len)
    serve.run(app, name="laten", route_prefix="/")
    return f"http://{host}:{port}/v1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder (e.g. a merged one) or tiny:NAME")
    p.add_argument("--name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--engine", choices=["vllm", "hf", "auto"], default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: the job's, or a new local one)")
    p.add_argument("--detach", action="store_true",
                   help="return once deployed and leave the app running on the cluster (a job does this)")


def run(args) -> int:
    """Deploy; unless --detach, serve until SIGINT/SIGTERM, then shut the app down."""
    try:
        url = deploy(args.model, args.name, args.engine, args.dtype, args.device, args.host, args.port,
                     args.max_model_len, args.num_cpus, args.num_gpus, args.address)
    except (ValueError, FileNotFoundError) as e:
        print(f"laten: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"serving {args.name or args.model} at {url} (POST /completions, /chat/completions; GET /models)",
          flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m jobs.serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
