"""Concurrent first opens of one fresh SQLite MLflow store, from separate processes, never break it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

PROCESSES = 4
# Each process imports MLflow, says it is ready, waits for the barrier file, then opens the store.
# Without the lock in make_client, 3 of 3 trials had processes failing in MLflow's migrations
# ("table _alembic_tmp_latest_metrics already exists", "Online migration expected to match one row").
OPEN_AT_THE_BARRIER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loraops.registry.store import make_client

    uri, ready, barrier = sys.argv[1:4]
    Path(ready).touch()
    while not Path(barrier).exists():
        time.sleep(0.01)
    client = make_client(uri)
    client.create_experiment(f"from-{Path(ready).name}")
    """
)


@pytest.mark.slow  # four processes importing MLflow: ~40 s on 2 busy cores
def test_processes_opening_a_fresh_sqlite_store_together_all_succeed(tmp_path):
    from loraops.registry.store import make_client

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    barrier = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_THE_BARRIER, uri, str(tmp_path / f"p{i}"), str(barrier)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"p{i}").exists() for i in range(PROCESSES)):
        assert all(p.poll() is None for p in processes), [p.communicate()[1][-2000:] for p in processes]
        assert time.monotonic() < deadline, "processes did not get ready"
        time.sleep(0.05)
    barrier.touch()
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * PROCESSES, [e[-2000:] for e in errors]

    client = make_client(uri)  # and the store opens fine afterwards, with every process's experiment
    names = {experiment.name for experiment in client.search_experiments()}
    assert names == {"Default", *(f"from-p{i}" for i in range(PROCESSES))}
