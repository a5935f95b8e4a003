"""Serve a model with an OpenAI-compatible HTTP API on Ray Serve:
`python -m jobs.serve --model DIR [--port 8000]` (and `laten serve`).

POST /v1/completions, POST /v1/chat/completions (both with "stream": true too), GET /v1/models.
vLLM's async engine answers when vLLM is installed, transformers otherwise. A bad request
gets a 4xx JSON error naming the problem; the server keeps serving.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ray import serve

from actors.server import OpenAIServer
from laten_ray import entry


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
    url = deploy(args.model, args.name, args.engine, args.dtype, args.device, args.host, args.port,
                 args.max_model_len, args.num_cpus, args.num_gpus, args.address)
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
    args = p.parse_args(argv)
    return entry.run(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
