"""A tracking server lost during a run fails the run, bounded and in one line, with nothing registered."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading

import pytest
from conftest import mlflow_server

from loraops.registry.limits import bounded_requests, http_settings


def test_inside_a_run_mlflow_tries_a_dropped_request_once_more_then_gives_up():
    """MLflow's default is 7 retries with growing backoff (minutes); bounded, a request is tried twice."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    attempts = []
    listener = socket.create_server(("127.0.0.1", 0))

    def drop_every_connection():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            attempts.append(1)
            connection.close()  # accepted, then dropped without an answer: what a dying server does

    threading.Thread(target=drop_every_connection, daemon=True).start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    before = {name: os.environ.get(name) for name in http_settings(60)}
    try:
        with bounded_requests(60):
            with pytest.raises(MlflowException):
                MlflowClient(tracking_uri=uri).get_experiment_by_name("any")
    finally:
        listener.close()
    assert len(attempts) == 2
    assert {name: os.environ.get(name) for name in before} == before  # restored after the run


def test_the_bounded_settings_fit_in_the_timeout():
    for timeout_s in (10, 60, 600):
        settings = http_settings(timeout_s)
        attempts = 1 + int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        worst = (
            attempts * 2 * int(settings["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + 5
        )  # connect + read per attempt, health check
        assert worst <= timeout_s and settings["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "0"


@pytest.fixture
def killable_tracking_server(tmp_path):
    """A real `mlflow server` on loopback: (url, process, its SQLite store)."""
    with mlflow_server(tmp_path, health_timeout_s=90) as server:
        yield server


class _KillWhenTrainingStarts(logging.Handler):
    """Kills the server's process group (uvicorn and its worker) when training logs its first line."""

    def __init__(self, process: subprocess.Popen):
        super().__init__()
        self.process, self.killed = process, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.killed and record.getMessage().startswith("Training on"):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
            self.killed = True


@pytest.mark.slow  # a real mlflow server and a whole retrain: ~1-2 min on 2 busy cores
@pytest.mark.integration
def test_a_tracking_server_killed_during_training_fails_the_run_in_one_line_registering_nothing(
    tiny_project, killable_tracking_server, prefect_harness, capfd
):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from typer.testing import CliRunner

    from loraops.cli.app import app
    from mlflow import MlflowClient

    url, server, store = killable_tracking_server
    killer = _KillWhenTrainingStarts(server)
    training_log = logging.getLogger("loraops.train.trainer")
    training_log.addHandler(killer)
    level = training_log.level
    training_log.setLevel(logging.INFO)
    try:
        result = CliRunner().invoke(
            app, ["retrain", "--params", str(tiny_project / "params.yaml"), "-S", f"registry.tracking_uri={url}"]
        )
    finally:
        training_log.removeHandler(killer)
        training_log.setLevel(level)
    captured = capfd.readouterr()
    output = result.output + captured.out + captured.err

    assert killer.killed, output[-3000:]
    assert result.exit_code == 1, output[-3000:]
    assert (
        f"error: MLflow tracking server {url} stopped answering during train-adapter; nothing was registered "
        "(its MLflow run stays RUNNING until the next run marks it FAILED); the checkpoints written so far are kept "
        "in checkpoints/ (a rerun resumes from the last); rerun `loraops retrain` once the server is back"
    ) in output
    assert "Traceback" not in output
    assert not (tiny_project / "adapters" / "candidate").exists()  # training stopped at its first logged step
    assert not (tiny_project / "metrics" / "adapter.json").exists()

    local = f"sqlite:///{store}"  # the dead server's own store: the run opened at training start, no version
    client = MlflowClient(tracking_uri=local, registry_uri=local)
    assert client.search_registered_models() == []
    runs = [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])]
    assert [run.info.status for run in runs] == ["RUNNING"]  # no server to end it: the next run's orphan sweep does

    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
        run = next(r for r in flow_runs if r.parameters.get("project_dir") == str(tiny_project))
        assert run.state.is_failed() and "stopped answering during train-adapter" in run.state.message
        in_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        task_runs = prefect.read_task_runs(flow_run_filter=in_run)
        assert [t.run_count for t in task_runs if t.name.startswith("train-adapter")] == [1]  # not retried
        assert not [t for t in task_runs if t.name.startswith(("evaluate-adapter", "gate-candidate"))]
