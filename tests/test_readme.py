"""The README is a test: its shell blocks run in order, as a new user runs them, in a scratch
copy of this checkout with a fresh virtual environment and a fresh home, and what it shows as
output must be what the commands print.

Every ```bash block (and any other block to run) is preceded by one marker comment:
  <!-- readme-test: run -->                    run it; it must exit 0
  <!-- readme-test: background "TEXT" -->      start it and wait until its output shows TEXT;
                                               it runs on until the end (a server)
  <!-- readme-test: skip REASON -->            not run here, and why (a synopsis, a GPU cluster)
  <!-- readme-test: output -->                 the next block or table is output of the last block
                                               run: each of its lines (but `...`) must be printed
                                               by it, durations (0.08s), dates and the home folder
                                               (/home/you) aside
  <!-- readme-test: output "TEXT" -->          the same, of the last block run whose text has TEXT
A ```bash block without a marker fails the test, so a new one is classified when it is written.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import stop_group

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*readme-test:\s*(run|background|skip|output)\b(.*?)-->")
FENCE = re.compile(r"^```(\w*)\s*$")
BLOCK_TIMEOUT_S = 1500  # the first block installs everything
BACKGROUND_WAIT_S = 300


@dataclass
class Step:
    kind: str       # run, background, skip, output
    arg: str        # the background's ready text, the skip's reason
    lang: str       # bash, python, text, table
    text: str
    line: int       # where it starts in README.md


def steps(readme: str) -> list[Step]:
    """The README's marked blocks and tables in order; a bash block without a marker is an error."""
    lines = readme.splitlines()
    out, pending, i = [], None, 0
    while i < len(lines):
        m = MARKER.search(lines[i])
        if m:
            pending = (m.group(1), m.group(2).strip(), i + 1)
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            lang = fence.group(1) or "text"
            if pending:
                out.append(Step(pending[0], pending[1], lang, "\n".join(lines[i + 1:end]), i + 1))
            elif lang in ("bash", "sh", "shell"):
                raise AssertionError(f"README.md:{i + 1}: a {lang} block without a readme-test marker")
            pending, i = None, end + 1
            continue
        if lines[i].startswith("|") and pending and pending[0] == "output":
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
            out.append(Step("output", "", "table", "\n".join(lines[i:end]), i + 1))
            pending, i = None, end
            continue
        if lines[i].strip() and pending and not lines[i].lstrip().startswith("<!--"):
            raise AssertionError(f"README.md:{pending[2]}: the readme-test marker is not followed by a block")
        i += 1
    return out


def normalized(line: str) -> str:
    """Durations and dates vary from run to run; everything else must be as shown."""
    line = re.sub(r"\b\d+(\.\d+)?s\b", "Ns", line.strip())
    return re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*", "DATE", line)


def scratch_copy(dest: Path) -> None:
    """What a fresh clone of this checkout holds: the tracked files and the new ones git would
    add, nothing ignored (no .venv, runs/, studies/)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def fresh_env(home: Path) -> dict[str, str]:
    """A new user's shell: a new home, PATH without this test's virtual environment, and the
    pip settings of the machine (which index it may use), nothing of this session's Ray or caches."""
    ours = Path(sys.prefix)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not Path(p).is_relative_to(ours)]
    env = {"HOME": str(home), "PATH": os.pathsep.join(path), "LANG": "C.UTF-8", "TERM": "dumb",
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))}
    env.update({k: v for k, v in os.environ.items()
                if k.startswith(("PIP_", "PYENV", "SSL_CERT", "REQUESTS_CA", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                                 "http_proxy", "https_proxy", "no_proxy"))})
    return env


def shell(text: str) -> list[str]:
    """bash that stops at the first failing command, in the venv once the README has made it."""
    return ["bash", "-c", "set -eo pipefail\n[ -f .venv/bin/activate ] && . .venv/bin/activate\n" + text]


@pytest.mark.slow
@pytest.mark.ray
def test_the_readme_runs_in_order_as_written(tmp_path):
    plan = steps((REPO / "README.md").read_text(encoding="utf-8"))
    assert sum(s.kind == "run" for s in plan) >= 8, "the README lost its runnable commands"
    work, home = tmp_path / "laten-ray", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    scratch_copy(work)
    env = fresh_env(home)
    background: list[tuple[subprocess.Popen, Path]] = []
    outputs: list[tuple[str, str]] = []  # (block text, what it printed), in order
    transcript = []
    try:
        for step in plan:
            where = f"README.md:{step.line}"
            if step.kind == "skip":
                assert step.arg, f"{where}: say why the block is not run"
                continue
            if step.kind == "output":
                of = step.arg.strip('"')
                last = next((out for text, out in reversed(outputs) if of in text), None)
                assert last is not None, f"{where}: no block run before it has {of!r}"
                shown = [normalized(x) for x in step.text.splitlines() if x.strip() and x.strip() != "..."]
                printed = {normalized(x.replace(str(home), "/home/you")) for x in last.splitlines()}
                missing = [x for x in shown if x not in printed]
                assert not missing, f"{where}: the README shows lines the command did not print: {missing}\n" \
                                    f"it printed:\n{last[-4000:]}"
                continue
            command = shell(step.text) if step.lang in ("bash", "sh", "shell") else \
                shell(f"python - <<'PYTHON'\n{step.text}\nPYTHON")
            if step.kind == "background":
                ready = step.arg.strip('"')
                log = tmp_path / f"background-{step.line}.log"
                with open(log, "w") as f:
                    proc = subprocess.Popen(command, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                background.append((proc, log))
                deadline = time.monotonic() + BACKGROUND_WAIT_S
                while ready not in log.read_text(errors="replace"):
                    assert proc.poll() is None, f"{where}: ended before {ready!r}:\n{log.read_text()[-4000:]}"
                    assert time.monotonic() < deadline, f"{where}: no {ready!r} in {BACKGROUND_WAIT_S} s"
                    time.sleep(1)
                outputs.append((step.text, log.read_text(errors="replace")))
                continue
            t0 = time.monotonic()
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            outputs.append((step.text, done.stdout + done.stderr))
            transcript.append(f"{where}: exit {done.returncode} in {time.monotonic() - t0:.0f} s")
            assert done.returncode == 0, \
                f"{where} failed (exit {done.returncode}):\n{step.text}\n---\n{outputs[-1][1][-6000:]}"
    finally:
        for proc, _ in background:
            stop_group(proc, signal.SIGINT)  # Ctrl-C, as a user stops a server
        ray = work / ".venv" / "bin" / "ray"
        if ray.exists():
            subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)
        print("\n".join(transcript))
    # the fresh environment the README made is the one a CPU machine should get
    listed = subprocess.run(shell("pip list --format freeze"), cwd=work, env=env, capture_output=True, text=True)
    assert not [p for p in listed.stdout.splitlines() if p.lower().startswith("nvidia")], listed.stdout
    assert "torch==2.13.0+cpu" in listed.stdout.splitlines()


def test_the_readme_markers_are_read_as_intended():
    """The parser itself, on a README of three blocks and a table."""
    text = "\n".join([
        "<!-- readme-test: run -->", "```bash", "echo hi", "```", "prose",
        "<!-- readme-test: output -->", "| a | b |", "| --- | --- |", "",
        '<!-- readme-test: background "ready" -->', "```bash", "serve", "```",
        "<!-- readme-test: skip a synopsis -->", "```bash", "laten x [--y]", "```"])
    got = [(s.kind, s.arg, s.lang, s.text) for s in steps(text)]
    assert got == [("run", "", "bash", "echo hi"), ("output", "", "table", "| a | b |\n| --- | --- |"),
                   ("background", '"ready"', "bash", "serve"), ("skip", "a synopsis", "bash", "laten x [--y]")]
    with pytest.raises(AssertionError, match="README.md:1: a bash block without a readme-test marker"):
        steps("```bash\nls\n```")
    assert normalized("step 1/8  step 0.08s  wall 12s") == normalized("step 1/8  step 0.11s  wall 3s")
