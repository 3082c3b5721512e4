"""The `retrain` deployment's own schedule creates the runs: a real Prefect server with its scheduler, a
process worker, data from a DVC data registry. The first scheduled run trains on the registry's new
rows; the next one, with nothing new, ends early."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import GIT, REPO_ROOT, background_process, free_port, make_project, wait_until_healthy
from test_data_registry import add_rows, import_from, make_registry
from test_deployments import BIN, RUN_S, SERVER_START_S, _cli, _deploy

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server whose scheduler looks every 2 s and keeps one future run per schedule."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-server-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS="1",
        PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS="1",
    )
    log = tmp_path / "prefect-server.log"
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background_process(command, env, log) as process:
        url = f"http://127.0.0.1:{port}/api"
        wait_until_healthy("prefect", f"{url}/health", process, log, time.monotonic() + SERVER_START_S)
        yield {"prefect": url}


def _project(tmp_path: Path, tiny_model_dir: Path, registry: Path) -> Path:
    """A worker's checkout: code, params (MLflow in sqlite inside it, inline training), data imported from the registry."""
    project = make_project(tmp_path / "project", tiny_model_dir, registry={"auto_promote": True})
    import_from(project, registry)
    for package in ("flows", "tasks"):
        shutil.copytree(REPO_ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "flows and tasks"], cwd=project, check=True)
    return project


def _finished_scheduled_runs(client, deployment_id, done: set, worker: list[str], env: dict, deadline: float) -> list:
    """Start ``--run-once`` workers until a run the scheduler created (not in ``done``) has finished.

    While a run trains the 5 s schedule piles up due runs; a worker takes them all and the deployment's
    concurrency limit lets one run, so which one runs is the server's choice, and a slot freed by the
    previous run can take a moment to be released: hence "until one finished", not one chosen run.
    """
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    while time.monotonic() < deadline:
        _cli(worker, env, timeout=RUN_S)
        runs = client.read_flow_runs(deployment_filter=only, limit=200)
        finished = [run for run in runs if run.id not in done and run.state.is_final()]
        if finished:
            return finished
        time.sleep(2)
    pytest.fail("no scheduled retrain run finished by the deadline")


def test_the_schedule_starts_a_run_that_trains_on_new_registry_rows_then_one_that_ends_early(
    prefect_server, tiny_model_dir, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from loraops.lineage.versioning import read_data_version
    from mlflow import MlflowClient

    registry = make_registry(tmp_path / "registry")
    project = _project(tmp_path, tiny_model_dir, registry)
    new_rev = add_rows(registry, "Count 2", "Count 3")  # new rows in the registry after the checkout imported
    env, _ = _deploy(prefect_server, tmp_path, project)
    host = {**env, "LORAOPS_PROJECT_DIR": str(project), "PREFECT_HOME": str(tmp_path / "cpu-home")}
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"]

    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_server["prefect"]}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name("retrain/retrain")
        for schedule in deployment.schedules:  # the weekly cron gives way to a short interval for the test
            client.delete_deployment_schedule(deployment.id, schedule.id)
        client.create_deployment_schedules(
            deployment.id, [(IntervalSchedule(interval=timedelta(seconds=5)), True)], max_scheduled_runs=1
        )
        (first,) = _finished_scheduled_runs(client, deployment.id, set(), worker, host, time.monotonic() + RUN_S)
        assert first.auto_scheduled and first.state.is_completed() and first.state.name == "Completed", first.state
        assert first.state.message.startswith("registered tiny-adapter v1"), first.state.message

        later = _finished_scheduled_runs(client, deployment.id, {first.id}, worker, host, time.monotonic() + RUN_S)
        for run in later:  # nothing new in the registry since the first run: each ends early
            assert run.auto_scheduled and run.state.is_completed(), run.state
            assert run.state.message.startswith("nothing changed since version 1") and "unchanged" in run.tags

    # The first run trained on the registry's new revision: data.dvc was refreshed, the version names it.
    data = read_data_version(project)
    assert data.rev == new_rev and "Count 3" in (project / "data" / "train.jsonl").read_text()
    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("tiny-adapter", "champion")
    assert version.tags["loraops.data_md5"] == data.md5
    assert version.tags["loraops.data_source"].endswith(f"@{new_rev}")
