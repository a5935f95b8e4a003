"""The shipped Grafana dashboard (monitoring/laten_grafana_dashboard.json) against a real
Prometheus: a local Ray cluster on 127.0.0.1, Debian's Prometheus scraping it with the
configuration Ray writes for the session, a short `laten train --ray`, a short study and a
`laten serve` answering a few requests; then every PromQL query of the dashboard, run as
Grafana runs a panel's query (a range query, its variables filled in), must return a series of
that run, study or application."""
from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import debian_tool, free_port, stop_group, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "monitoring" / "laten_grafana_dashboard.json"
RAY = str(Path(sys.executable).with_name("ray"))
RUN, STEPS, STUDY, APP = "monrun", 4, "monstudy", "laten"
VALUES = {"run": RUN, "study": STUDY, "application": APP}  # each template variable's value here
RATE_INTERVAL = "30s"   # what Grafana's $__rate_interval is at a 1 s scrape interval and a short range
DATA_WAIT_S = 90        # Ray exports metrics every 10 s; Prometheus scrapes every 1 s


def test_the_shipped_dashboard_is_what_make_dashboard_writes():
    dashboard = runpy.run_path(str(REPO / "monitoring" / "make_dashboard.py"))["dashboard"]
    assert json.loads(DASHBOARD.read_text()) == dashboard(), "run `python monitoring/make_dashboard.py`"


def queries() -> list[tuple[str, str, str]]:
    """(panel title, PromQL, the template variable it is filtered by) of every panel target."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            used = [v for v in VALUES if f"${v}" in target["expr"]]
            assert len(used) == 1, f"{panel['title']}: {target['expr']} is filtered by {used}, not one variable"
            out.append((panel["title"], target["expr"], used[0]))
    return out


def filled(expr: str) -> str:
    """The query Grafana sends: one value for each variable, $__rate_interval a duration."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$(\w+)", lambda m: re.escape(VALUES[m.group(1)]), expr)


def get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    """check() until it returns something true, at most timeout_s; its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except (OSError, urllib.error.URLError):
            got = None
        if got or time.monotonic() > deadline:
            assert got, f"{what}: nothing after {timeout_s:.0f} s"
            return got
        time.sleep(every_s)


def run_cli(info, *args: str, timeout: float = 240) -> str:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=info["env"],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def complete(port: int, model: str) -> None:
    """A completion request; a model the server does not serve is its 404."""
    body = json.dumps({"model": model, "prompt": "1 + 1 =", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=60).close()
    except urllib.error.HTTPError as e:
        assert e.code == 404 and model == "no-such-model", e.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, laten_cache):
    """Ray head + Prometheus, then a train run, a study and a served app on them (serving on
    until the module's tests are done)."""
    prometheus = debian_tool("prometheus", "prometheus")
    tmp = tmp_path_factory.mktemp("monitoring")
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (tmp / "token").write_text(os.urandom(16).hex())
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(tmp / "token"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    gcs = f"127.0.0.1:{free_port()}"
    procs = []
    t0 = time.time()
    try:
        start = subprocess.run(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", gcs.split(":")[1],
             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--temp-dir", str(ray_dir), "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr

        # Ray's scrape configuration for the session (file-based discovery of every node's
        # metrics port); only the intervals change, 10 s -> 1 s, to keep the test short.
        config = yaml.safe_load((ray_dir / "session_latest/metrics/prometheus/prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = f"http://127.0.0.1:{free_port()}"
        with open(tmp / "prometheus.log", "w") as log:
            procs.append(subprocess.Popen(
                [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address={prom.removeprefix('http://')}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for("Prometheus scraping the Ray node", lambda: any(
            t["health"] == "up" for t in get(f"{prom}/api/v1/targets")["data"]["activeTargets"]), 60)

        info = {"env": env, "gcs": gcs, "prom": prom, "t0": t0}
        config = tiny_config_dict("llama", tmp / "runs", steps=STEPS)
        config["name"] = RUN
        (tmp / "run.yaml").write_text(yaml.safe_dump(config))
        assert f"step {STEPS}/{STEPS}" in run_cli(info, "train", "--ray", "--address", gcs,
                                                   "--config", str(tmp / "run.yaml"))
        run_cli(info, "study", "--config", "configs/study-demo.yaml", "--address", gcs, f"name={STUDY}",
                f"output_dir={tmp / 'studies'}", "arms=[target]", "seeds=1", "task.limit=4")

        port = free_port()
        with open(tmp / "serve.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", "serve", "--address", gcs, "--model", "tiny:llama-source",
                 "--engine", "hf", "--port", str(port), "--num-cpus", "0"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        def serving() -> bool:
            text = (tmp / "serve.log").read_text()
            assert procs[-1].poll() is None, f"laten serve ended:\n{text[-3000:]}"
            return "serving " in text
        wait_for("laten serve", serving, 180)
        # A request and a 404, and more of both once Prometheus has the app's first counts: a
        # rate needs an increase between two scrapes.
        complete(port, "tiny:llama-source")
        complete(port, "no-such-model")
        wait_for("the app's first requests in Prometheus", lambda: all(
            get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": f'{name}{{application="{APP}"}}'}))
            ["data"]["result"] for name in ("ray_serve_http_request_latency_ms_count",
                                            "ray_serve_num_http_error_requests_total")), DATA_WAIT_S)
        for model in ("tiny:llama-source",) * 3 + ("no-such-model",):
            complete(port, model)
        yield info
    finally:
        for proc in reversed(procs):
            stop_group(proc)
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)


def range_query(stack, expr: str) -> list[dict]:
    """The series of a range query from the module's start to now, one point a second (what a
    Grafana panel asks for)."""
    params = urllib.parse.urlencode({"query": expr, "start": stack["t0"], "end": time.time(), "step": "1s"})
    reply = get(f"{stack['prom']}/api/v1/query_range?{params}")
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


@pytest.mark.ray
@pytest.mark.slow
def test_every_dashboard_query_returns_a_series_of_the_run_study_or_app(stack):
    for title, expr, variable in queries():
        query = filled(expr)

        def ours():
            return [s for s in range_query(stack, query) if s["metric"].get(variable) == VALUES[variable]
                    and any(math.isfinite(float(v)) for _, v in s["values"])]
        wait_for(f"{title}: {query}", ours, DATA_WAIT_S)


@pytest.mark.ray
@pytest.mark.slow
def test_the_step_gauge_reaches_the_runs_last_step(stack):
    steps = next(expr for title, expr, _ in queries() if "ray_laten_step{" in expr)

    def last_step():
        values = [float(v) for s in range_query(stack, filled(steps)) for _, v in s["values"]]
        return max(values, default=0) == STEPS
    wait_for(f"ray_laten_step of {RUN} reaching {STEPS}", last_step, DATA_WAIT_S)


@pytest.mark.ray
@pytest.mark.slow
def test_each_template_variable_lists_the_run_study_or_app(stack):
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert [v["name"] for v in variables] == ["datasource", *VALUES]
    for v in variables[1:]:
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["query"]["query"]).groups()

        def listed() -> bool:
            params = urllib.parse.urlencode({"match[]": metric, "start": stack["t0"], "end": time.time()})
            return VALUES[v["name"]] in get(f"{stack['prom']}/api/v1/label/{label}/values?{params}")["data"]
        wait_for(f"{v['name']}: {v['query']['query']}", listed, DATA_WAIT_S)
