"""Serve a model with an OpenAI-compatible HTTP API on Ray Serve:
`python -m jobs.serve --model DIR [--port 8000]` (and `laten serve`).

POST /v1/completions, POST /v1/chat/completions (both with "stream": true too), GET /v1/models,
GET /health. vLLM's async engine answers when vLLM is installed and can run the model,
transformers otherwise. A bad or oversized request gets a 4xx JSON error naming the problem or
the limit (`--limit-*`); the server keeps serving.

As a Ray Serve config (`serve run configs/serve.yaml`), the application is `jobs.serve:build_app`
with the same settings as arguments (`limits` a mapping of the limit names).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from ray import serve

from actors.server import OpenAIServer
from laten_ray import entry
from laten_ray.ray_session import ray_session, requested_address
from laten_ray.serve.openai import ServeLimits

APP_KEYS = {"model", "name", "engine", "dtype", "device", "max_model_len", "num_cpus", "num_gpus", "limits",
            "stuck_after_s"}


def build_app(args: dict):
    """The application from a settings mapping: `laten serve`'s options, and Ray Serve's
    config-file entry point (`import_path: jobs.serve:build_app`, `args: {...}`)."""
    unknown = set(args) - APP_KEYS
    if unknown:
        raise ValueError(f"serve settings: unknown key(s) {sorted(unknown)}; known: {sorted(APP_KEYS)}")
    if "model" not in args:
        raise ValueError("serve settings: 'model' is required")
    from laten_ray.generate import use_vllm
    from laten_ray.models import check_spec
    model = str(args["model"])
    check_spec(model)  # a missing folder fails here, before Ray starts
    engine = args.get("engine", "auto")
    use_vllm(engine)  # an unknown engine, or vllm asked for but not installed, fails here too
    limits = ServeLimits.from_dict(args.get("limits"))
    stuck_after_s = args.get("stuck_after_s", 120.0)
    if isinstance(stuck_after_s, bool) or not isinstance(stuck_after_s, (int, float)) or stuck_after_s <= 0:
        raise ValueError(f"serve settings: stuck_after_s must be a positive number of seconds, got {stuck_after_s!r}")
    name = args.get("name") or (model if model.startswith("tiny:") else Path(model).name)
    options = {"num_cpus": args.get("num_cpus", 1.0), "num_gpus": args.get("num_gpus", 0.0)}
    return OpenAIServer.options(ray_actor_options=options).bind(
        model, name, engine, args.get("dtype", "float32"), args.get("device", "auto"), args.get("max_model_len"),
        asdict(limits), float(stuck_after_s))


def deploy(app, host: str = "127.0.0.1", port: int = 8000) -> tuple[str, dict]:
    """Deploy the app on the connected cluster; its base URL and what the replica runs (engine,
    fallback reason). An engine that cannot run the model is a ValueError naming it."""
    serve.start(http_options={"host": host, "port": port})
    try:
        handle = serve.run(app, name="laten", route_prefix="/")
    except RuntimeError:  # the replica's own error is in the deployment's status
        status = serve.status().applications.get("laten")
        messages = [d.message for d in status.deployments.values()] if status else []
        reason = next((line.split("EngineUnavailable: ")[-1] for m in messages for line in m.splitlines()
                       if "EngineUnavailable: " in line), None)
        serve.shutdown()
        if reason is None:
            raise
        raise ValueError(reason) from None
    return f"http://{host}:{port}/v1", handle.describe.remote().result()


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
    p.add_argument("--address", default=None, help="the Ray cluster to join (default: $RAY_ADDRESS, which a "
                   "job has; else a private local one, stopped with the server)")
    p.add_argument("--stuck-after-s", type=float, default=120.0,
                   help="health fails (and Ray Serve replaces the replica) after this long with work and no token")
    limits = p.add_argument_group("request limits (checked before any tokenization; over one: 413 or 400 naming it)")
    for key, default in asdict(ServeLimits()).items():
        limits.add_argument(f"--limit-{key.replace('_', '-')}", dest=f"limit_{key}", type=int, default=default,
                            metavar="N", help=f"default {default}")
    p.add_argument("--detach", action="store_true",
                   help="return once deployed and leave the app running on the cluster (a job does this)")


def run(args) -> int:
    """Deploy; unless --detach, serve until SIGINT/SIGTERM, then shut the app down."""
    settings = {"model": args.model, "name": args.name, "engine": args.engine, "dtype": args.dtype,
                "device": args.device, "max_model_len": args.max_model_len, "num_cpus": args.num_cpus,
                "num_gpus": args.num_gpus, "stuck_after_s": args.stuck_after_s,
                "limits": {k: getattr(args, f"limit_{k}") for k in asdict(ServeLimits())}}
    app = build_app(settings)  # settings checked before Ray starts
    if args.detach and requested_address(args.address) == "local":
        raise ValueError("serve: --detach leaves the app on a cluster that outlives this command; give it one "
                         "with --address ADDR or $RAY_ADDRESS (a job has it), e.g. after `ray start --head`")
    # the replica's and Serve's own logs (one line per request) stay in Ray's log folder
    with ray_session(args.address, "laten-serve", log_to_driver=False):
        url, running = deploy(app, args.host, args.port)
        if running["fallback"]:
            print(f"laten serve: {running['fallback']}; serving with transformers instead", file=sys.stderr, flush=True)
        print(f"serving {args.name or args.model} with engine {running['engine']} at {url} "
              "(POST /completions, /chat/completions; GET /models, /health)", flush=True)
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
