"""What a user sees in the Ray dashboard during a `laten train --ray` job and a `laten study`
job, in a real browser: Debian's Chromium, headless, driven over its DevTools protocol on
127.0.0.1, against a local Ray cluster with token authentication. The token is typed into the
dashboard's dialog; the Jobs page must list the job, the Actors page `laten-source` and
`laten-target`, then, during a study, the Ray Train actors of its sft-lora run (Ray 2.60's
dashboard has no Train page; the run's name is read from Ray Train's state API). Screenshots go to
the test's output folder (LATEN_DASHBOARD_SCREENSHOT=FILE.png also saves the Actors page there,
as the README's docs/images/dashboard-actors.png was made)."""
from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from websockets.sync.client import connect  # websockets comes with ray[serve] (uvicorn[standard])

from helpers import debian_tool, free_port, stop_group, tiny_config_dict
from laten_ray.checkpoint import checkpoint_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
RUN = "browserrun"
STUDY = "browserstudy"
PAGE_WAIT_S = 60


class Browser:
    """Headless Chromium and one page of it, over the DevTools protocol (a websocket)."""

    def __init__(self, chromium: str, profile: Path):
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert self.proc.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30).__enter__()
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        """The reply to one command: its `result`, or its `error`."""
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:  # events arrive in between; the reply has our id
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == n:
                return message

    def call(self, method: str, **params) -> dict:
        reply = self.send(method, **params)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (a promise's, once it settles)."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                         awaitPromise=True)["result"].get("value")

    def text(self) -> str:
        """The page's text; empty while it (re)loads."""
        reply = self.send("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                          returnByValue=True)
        return reply.get("result", {}).get("result", {}).get("value") or ""

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.__exit__(None, None, None)
        stop_group(self.proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, laten_cache):
    """A one-node Ray cluster on 127.0.0.1 with token authentication, in a temp folder of its own."""
    tmp = tmp_path_factory.mktemp("dashboard")
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = os.urandom(16).hex()
    (tmp / "token").write_text(token)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(tmp / "token"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    try:
        start = subprocess.run(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus", "2",
             "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard_port), "--temp-dir", str(ray_dir), "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr
        yield {"env": env, "token": token, "tmp": tmp, "gcs": f"127.0.0.1:{gcs_port}",
               "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = debian_tool("chromium", "chromium")
    b = Browser(chromium, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def training_job(cluster):
    """`ray job submit` of a run long enough to be looked at while it trains; stopped after."""
    # about 0.3 s a step here, a 1.4 MB checkpoint each: long enough, and stopped once looked at
    config = tiny_config_dict("llama", cluster["tmp"] / "runs", steps=300, align_per_step=30)
    config["name"] = RUN
    (cluster["tmp"] / "run.yaml").write_text(yaml.safe_dump(config))
    job_id = submit(cluster, "python", "-m", "jobs.train", "--config", str(cluster["tmp"] / "run.yaml"))
    run_dir = cluster["tmp"] / "runs" / RUN
    deadline = time.monotonic() + 180
    while not (run_dir.is_dir() and checkpoint_steps(run_dir)):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(1)
    try:
        yield job_id
    finally:
        stop(cluster, job_id)


def submit(cluster, *command: str) -> str:
    """`ray job submit --no-wait` of `command` from the repository; the job's id."""
    submit = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--runtime-env",
              "runtime_env.yaml", "--no-wait", "--", *command]
    done = subprocess.run(submit, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"raysubmit_\w+", done.stdout).group(0)


def stop(cluster, job_id: str) -> None:
    subprocess.run([RAY, "job", "stop", "--address", cluster["dashboard"], job_id], env=cluster["env"],
                   capture_output=True, timeout=120)


def show(browser: Browser, cluster, path: str, *texts: str, timeout_s: float = PAGE_WAIT_S) -> str:
    """Open a dashboard page and wait until it shows every one of `texts`; when it asks for the
    cluster's token (the first time), type it into its dialog as a user does."""
    browser.call("Page.navigate", url=f"{cluster['dashboard']}/#{path}")
    deadline = time.monotonic() + timeout_s
    while True:
        shown = browser.text()
        if "Authentication Token Required" in shown:
            browser.js("document.querySelector('input[placeholder=\"Enter your authentication token\"]').select()")
            browser.call("Input.insertText", text=cluster["token"])
            browser.js("[...document.querySelectorAll('button')].find(b => b.textContent.trim() == 'Submit').click()")
        elif all(t in shown for t in texts):
            return shown
        assert time.monotonic() < deadline, f"{path}: {texts} not shown after {timeout_s} s; it shows:\n{shown[:3000]}"
        time.sleep(0.5)


def test_jobs_and_actors_pages_show_the_training_job(cluster, browser, training_job, tmp_path):
    show(browser, cluster, "/jobs", training_job, "RUNNING")
    browser.screenshot(tmp_path / "jobs.png")
    show(browser, cluster, "/actors", "laten-source", "laten-target")
    browser.screenshot(tmp_path / "actors.png")
    if os.environ.get("LATEN_DASHBOARD_SCREENSHOT"):
        shutil.copy(tmp_path / "actors.png", os.environ["LATEN_DASHBOARD_SCREENSHOT"])
    print(f"screenshots: {tmp_path}")


def test_a_studys_fine_tuning_run_shows_as_ray_train(cluster, browser, training_job, tmp_path):
    """A study's sft-lora arm trains as a Ray Train run: the Actors page lists its controller and
    worker, and Ray Train's state API (what a Train dashboard reads; Ray 2.60's own dashboard has
    no Train page) lists the run by the study's, the arm's and the seed's name, read with the
    browser's own session. The training job is stopped first: its actors hold the CPUs."""
    stop(cluster, training_job)
    job_id = submit(cluster, "python", "-m", "jobs.study", "--config", "configs/study-demo.yaml", f"name={STUDY}",
                    f"output_dir={cluster['tmp'] / 'studies'}", "arms=[target,sft-lora]", "seeds=1", "budgets=[64]", "task.limit=4", "ray.train_workers=1")
    try:
        try:
            show(browser, cluster, "/actors", "TrainController", "RayTrainWorker", timeout_s=240)
        except AssertionError as e:  # what the study job said
            logs = subprocess.run([RAY, "job", "logs", "--address", cluster["dashboard"], job_id], env=cluster["env"],
                                  capture_output=True, text=True, timeout=120)
            raise AssertionError(f"{str(e)[:1500]}\nthe study job's log:\n{(logs.stdout + logs.stderr)[-4000:]}") from None
        browser.screenshot(tmp_path / "train-actors.png")
        runs = train_runs(browser)
    finally:
        stop(cluster, job_id)
    assert any(re.fullmatch(rf"laten-study-{STUDY}-sft-lora-s0-[0-9a-f]{{10}}", name) for name, _ in runs), runs
    print(f"screenshots: {tmp_path}")


def train_runs(browser: Browser, timeout_s: float = 120) -> list:
    """[name, status] of each run in Ray Train's state API, fetched by the page (its session), once
    it lists one: the controller registers its run with Ray Train's state actor after it starts,
    and the API answers 500 until that actor exists."""
    deadline, answer = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        answer = browser.js("fetch('/api/train/v2/runs/v1').then(r => r.ok ? r.json() : r.text())"
                            ".then(j => j.train_runs ? j.train_runs.map(t => [t.name, t.status]) : j)")
        if isinstance(answer, list) and answer:
            return answer
        time.sleep(1)
    raise AssertionError(f"Ray Train's state API lists no run after {timeout_s} s: {answer!r}"[:3000])
