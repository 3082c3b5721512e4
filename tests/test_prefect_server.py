"""`loraops retrain` without a Prefect API: its temporary Prefect server dies with it, even on SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

STARTED = re.compile(r"temporary Prefect server at (http://127\.0\.0\.1:\d+)/api \(pid (\d+)\)")


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie left for a parent that does not reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(condition, limit_s: float, what: str, log: Path):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{what} within {limit_s:.0f} s:\n{log.read_text()[-3000:]}")


def test_the_temporary_prefect_server_dies_when_retrain_is_killed(tiny_project, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # the temporary server's database, not ~/.prefect's
    log = tmp_path / "retrain.log"
    command = [sys.executable, "-m", "loraops", "retrain", "--params", str(tiny_project / "params.yaml")]
    with log.open("w") as output:
        retrain = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    server_pid = None
    try:
        started = _wait_for(lambda: STARTED.search(log.read_text()), 180, "no temporary server started", log)
        url, server_pid = started.group(1), int(started.group(2))
        assert _answers(url) and _alive(server_pid)

        retrain.send_signal(signal.SIGKILL)  # no atexit hook runs
        retrain.wait(timeout=20)

        _wait_for(lambda: not _alive(server_pid), 60, "the server outlived the killed command", log)
        assert not _answers(url)
    finally:
        if retrain.poll() is None:
            retrain.kill()
            retrain.wait(timeout=20)
        if server_pid and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


DRAIN_SCRIPT = """
import logging
from prefect import flow
from loraops.cli.prefect_server import temporary_server

@flow(log_prints=True)
def chatty():
    from prefect import get_run_logger
    for i in range(200):
        get_run_logger().info("line %d", i)

with temporary_server():
    chatty()
"""


def test_the_temporary_server_receives_the_runs_last_logs_before_it_stops(tmp_path):
    """Logs a flow queued at its end reach the temporary server before it stops: no "Error logging to API"."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [sys.executable, "-c", DRAIN_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error logging to API" not in done.stderr + done.stdout
