"""The one way every command starts or joins Ray.

A command joins an existing cluster only when asked: `--address ADDR`, or `$RAY_ADDRESS` (the
Ray convention; a `ray job submit` driver has it set). Otherwise it starts a private local
cluster on 127.0.0.1 and shuts it down when it is done, so a cluster that happens to run on the
machine (another project's) is neither joined nor touched. A cluster lost while a command runs
(stopped, killed, its node gone) ends the command with one `laten: error:` line naming it, not
with Ray's minute-long retries and traces.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from . import entry

CHECK_EVERY_S = 1.0
MISSES = 3  # consecutive failed connections to the cluster's GCS before it counts as lost


class ClusterError(ValueError):
    """The cluster asked for cannot be joined; the message names its address."""


def requested_address(address: str | None) -> str:
    """The address a command was asked to join, or "local" for a private cluster of its own."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


class _Watchdog(threading.Thread):
    """Connects to the cluster's GCS port now and then; when it stops answering, the process
    ends with one error line. Checkpoints and outputs are written atomically, so nothing a
    resume needs is lost by ending here."""

    def __init__(self, gcs: str, label: str):
        super().__init__(name="laten-ray-watchdog", daemon=True)
        self.gcs, self.label, self.stopped = gcs, label, threading.Event()

    def run(self) -> None:
        misses = 0
        while not self.stopped.wait(CHECK_EVERY_S):
            misses = 0 if _answers(self.gcs, timeout_s=2.0) else misses + 1
            if misses >= MISSES and not self.stopped.is_set():
                print(f"laten: error: lost the Ray cluster {self.label}: its GCS stopped answering (was it "
                      "stopped, e.g. by `ray stop`, or did its head node go away?). Run the command again: "
                      "finished work is kept", file=sys.stderr, flush=True)
                os._exit(2)


@contextmanager
def ray_session(address: str | None, namespace: str, log=None, log_to_driver: bool = True) -> Iterator[str]:
    """Ray for one command: join `address` / $RAY_ADDRESS, or start a private local cluster (shut
    down at exit). Yields the GCS address. Inside an already connected process (a test, a caller
    that started Ray itself) it uses that connection and leaves it as it is. `log_to_driver`:
    whether the workers' output is copied to this terminal (else it is in Ray's log folder)."""
    import ray

    entry.set_process_defaults()
    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    wanted = requested_address(address)
    private = wanted == "local"
    source = "--address" if address else "$RAY_ADDRESS"

    def cannot_join(why: str) -> ClusterError:
        return ClusterError(f"could not join the Ray cluster at {wanted} ({source}): "
                            f"{why}; start one (`ray start --head`), fix the address, or leave it out to run on a "
                            "private local cluster")
    if not private and not _answers(wanted):
        raise cannot_join("nothing answers there")
    try:
        if private:
            info = ray.init(address="local", namespace=namespace, log_to_driver=log_to_driver,
                            _node_ip_address="127.0.0.1")
        else:
            info = ray.init(address=wanted, namespace=namespace, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise cannot_join(_first_line(e)) from None
    if not log_to_driver:
        _quiet_cluster_errors()
    gcs = ray.get_runtime_context().gcs_address
    label = f"at {gcs}" + (" (the private one this command started)" if private else "")
    if log is not None:
        dashboard = getattr(info, "dashboard_url", "") or ""
        kind = "a private local Ray cluster" if private else f"the Ray cluster at {wanted}"
        log(f"on {kind} ({gcs})" + (f", dashboard http://{dashboard}" if dashboard and private else ""))
    watchdog = _Watchdog(gcs, label)
    watchdog.start()
    try:
        yield gcs
    finally:
        watchdog.stopped.set()
        ray.shutdown()  # a joined cluster keeps running; a private one stops with its driver


def _quiet_cluster_errors() -> None:
    """Keep the cluster-wide error messages that Ray's driver copies to this terminal (a
    stopping autoscaler's trace, other jobs' failures) out of it: a command that leaves its
    workers' output in Ray's log folder leaves those there too. Ray has no option for it; its
    error-listening thread prints through this module-level function, which nothing else here
    uses once log_to_driver is off."""
    import ray
    if hasattr(ray._private.worker, "print_to_stdstream"):
        ray._private.worker.print_to_stdstream = lambda *args, **kwargs: None


def _answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether a HOST:PORT address accepts a connection within seconds (Ray itself retries for
    minutes); other forms (auto, ray://, a dashboard URL) are left to Ray."""
    m = re.fullmatch(r"([\w.\-]+|\[[0-9a-fA-F:]+\]):(\d+)", address)
    if not m:
        return True
    try:
        with socket.create_connection((m.group(1).strip("[]"), int(m.group(2))), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
