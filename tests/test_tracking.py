"""The live MLflow run: open while training, linked to its Prefect run, always ended; one version per adapter.

Real SQLite MLflow stores, the real tiny training, a real Prefect test server, and a real SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from loraops import names, stages
from loraops.project.params_file import load_config
from loraops.registry import runs as registry
from loraops.registry import tracking
from loraops.registry.store import client_for, ensure_experiment
from loraops.results import EvalMetrics, GateDecision, Lineage, TrainResult

TESTS = Path(__file__).parent


def _client(project: Path):
    return client_for(load_config(project / "params.yaml").registry, project)


class _Watch(TrainerCallback):
    """At the end of step ``at_step`` (logged after this hook), read the run as another process would."""

    def __init__(self, project: Path, at_step: int, fail: bool = False):
        self.project, self.at_step, self.fail, self.seen = project, at_step, fail, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.at_step:
            return
        client = _client(self.project)
        experiment = client.get_experiment_by_name(load_config(self.project / "params.yaml").registry.experiment)
        (run,) = client.search_runs([experiment.experiment_id])
        self.seen = run, client.get_metric_history(run.info.run_id, "loss")
        if self.fail:
            raise RuntimeError("training crashed")


@pytest.mark.integration
def test_the_run_is_running_during_training_with_step_metrics_and_the_prefect_run_id(tiny_project, prefect_harness):
    from prefect import flow

    watch = _Watch(tiny_project, at_step=5)  # after the first evaluation (step 4)
    after_training = {}

    @flow
    def train_then_fail(project: str):
        """Like retrain: train in the flow run, then a later step fails."""
        root = Path(project)
        cfg = load_config(root / "params.yaml")
        with tracking.flow_runs_failed_on_error(cfg, root):
            stages.prepare_base_model(cfg, root)
            trained = stages.train_adapter(cfg, root, callbacks=(watch,))
            after_training.update(trained=trained, status=_client(root).get_run(trained.mlflow_run_id).info.status)
            raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train_then_fail(str(tiny_project))

    during, losses = watch.seen
    flow_run_id = during.data.tags[names.PREFECT_FLOW_RUN_ID_TAG]
    assert during.info.status == "RUNNING"
    assert during.data.tags[names.PREFECT_FLOW_RUN_URL_TAG].endswith(f"/runs/flow-run/{flow_run_id}")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(flow_run_id).state.is_failed()  # the id is the real flow run's
    assert during.data.params["lora.r"] == str(load_config(tiny_project / "params.yaml").lora.r)
    assert [point.step for point in losses] == [1, 2, 3, 4]  # logged as they happened, not after training
    assert "eval_loss" in during.data.metrics

    trained = after_training["trained"]
    assert after_training["status"] == "RUNNING", "in a flow run, evaluation, gate and registration continue in it"
    client = _client(tiny_project)
    run = client.get_run(trained.mlflow_run_id)
    assert run.info.run_id == during.info.run_id
    assert run.info.status == "FAILED", "the flow failed after training: its run ends FAILED, not RUNNING"
    stamps = [point.timestamp for point in client.get_metric_history(run.info.run_id, "loss")]
    assert len(stamps) == 8 and stamps == sorted(stamps) and stamps[-1] > stamps[0]
    assert run.data.metrics["peak_memory_bytes"] > 0  # this process's peak RSS on the CPU
    assert run.info.start_time <= stamps[0]
    evals = {point.step: point.value for point in client.get_metric_history(run.info.run_id, "eval_loss")}
    assert evals[trained.best_step] == pytest.approx(trained.best_eval_loss)
    assert run.data.tags[names.ADAPTER_KEY_TAG]


def test_a_training_crash_ends_the_run_failed(tiny_project):
    cfg = load_config(tiny_project / "params.yaml")
    stages.prepare_base_model(cfg, tiny_project)
    watch = _Watch(tiny_project, at_step=3, fail=True)

    with pytest.raises(RuntimeError, match="training crashed"):
        stages.train_adapter(cfg, tiny_project, callbacks=(watch,))

    run = _client(tiny_project).get_run(watch.seen[0].info.run_id)
    assert watch.seen[0].info.status == "RUNNING"
    assert run.info.status == "FAILED"
    assert [point.step for point in watch.seen[1]] == [1, 2]
    assert names.PREFECT_FLOW_RUN_ID_TAG not in run.data.tags  # no flow run: `loraops stage train-adapter`


# --- registration into the live run -----------------------------------------------------------


@pytest.fixture
def adapter(tmp_path, tiny_model_dir) -> Path:
    from registry_helpers import make_adapter

    return make_adapter(tiny_model_dir, tmp_path / "adapters" / "candidate", seed=3)


@pytest.fixture
def cfg(tmp_path, tmp_path_factory):
    from registry_helpers import registry_config, shared_store_uri

    return registry_config(shared_store_uri(tmp_path_factory), tmp_path)  # own model and experiment names


def outcome(root: Path, adapter_dir: Path, run_id: str | None, passed: bool = True) -> dict:
    """What the stages hand to log_and_register after training in run ``run_id``."""
    history = root / "metrics" / "train_history.json"
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text('[{"loss": 2.4, "step": 1}, {"eval_loss": 2.2, "step": 1}]')
    return dict(
        trained=TrainResult(
            adapter_dir=str(adapter_dir),
            trainable_params=1_000,
            total_params=100_000,
            steps=1,
            best_step=1,
            best_eval_loss=1.5,
            stopped_early=False,
            history_path=str(history),
            mlflow_run_id=run_id,
        ),
        baseline=EvalMetrics.from_totals(200.0, 100, 4),
        candidate=EvalMetrics.from_totals(150.0 if passed else 250.0, 100, 4),
        decision=GateDecision(
            passed=passed,
            reasons=["1.5 < 2.0" if passed else "2.5 is worse than base 2.0"],
            baseline_loss=2.0,
            candidate_loss=1.5 if passed else 2.5,
        ),
        lineage=Lineage(
            git_commit="0" * 40,
            git_dirty=False,
            data_md5="d" * 32 + ".dir",
            dvc_lock_md5="e" * 32,
            params_hash="f" * 16,
            base_model="tiny",
        ),
    )


def test_registration_logs_into_the_training_run_and_ends_it_finished(cfg, tmp_path, adapter):
    live = tracking.start_run(cfg, tmp_path)

    registration = registry.log_and_register(cfg, root=tmp_path, **outcome(tmp_path, adapter, live.run_id))

    assert registration.run_id == live.run_id and registration.version == "1"
    run = live.client.get_run(live.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["adapter_val_loss"] == 1.5
    assert run.data.tags["loraops.gate"] == "passed"
    experiment = live.client.get_experiment_by_name(cfg.registry.experiment)
    assert len(live.client.search_runs([experiment.experiment_id])) == 1, "no second run for the registration"


def test_a_refused_run_ends_finished_and_its_prefect_link_names_the_gates_reasons(cfg, tmp_path, adapter):
    live = tracking.start_run(cfg, tmp_path)
    inputs = outcome(tmp_path, adapter, live.run_id, passed=False)

    registration = registry.log_and_register(cfg, root=tmp_path, **inputs)

    assert registration.version is None
    assert live.client.get_run(live.run_id).info.status == "FINISHED"  # a refusal is not a failure
    markdown = tracking.run_markdown(cfg, tmp_path, live.run_id, registration, inputs["decision"])
    assert live.run_id in markdown and cfg.registry.tracking_uri in markdown
    assert "2.5 is worse than base 2.0" in markdown and "Nothing registered" in markdown


def test_a_logging_failure_mid_run_ends_the_run_failed_and_registers_nothing(cfg, tmp_path, adapter):
    live = tracking.start_run(cfg, tmp_path)
    docs = tmp_path / "reports" / "data_docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html></html>")
    (docs / "gone.html").symlink_to(tmp_path / "deleted-while-uploading.html")  # the copy raises, as a full disk would

    with pytest.raises(OSError):
        registry.log_and_register(cfg, root=tmp_path, **outcome(tmp_path, adapter, live.run_id), extra_files=[docs])

    run = live.client.get_run(live.run_id)
    assert run.info.status == "FAILED"
    assert "adapter" in {item.path for item in live.client.list_artifacts(live.run_id)}, "it failed mid-upload"
    assert live.client.search_model_versions(f"name = '{cfg.registry.model_name}'") == []


def test_an_adapter_changed_after_training_is_refused_and_the_run_ends_failed(cfg, tmp_path, adapter, tiny_model_dir):
    """Weights swapped between training and registration (e.g. after evaluation) are not registered."""
    from registry_helpers import make_adapter

    from loraops.registry.integrity import AdapterIntegrityError

    live = tracking.start_run(cfg, tmp_path)
    tracking.tag_adapter(live, adapter)  # what training does when it ends
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=4)
    shutil.copyfile(other / "adapter_model.safetensors", adapter / "adapter_model.safetensors")

    with pytest.raises(AdapterIntegrityError, match=f"not the adapter MLflow run {live.run_id} trained"):
        registry.log_and_register(cfg, root=tmp_path, **outcome(tmp_path, adapter, live.run_id))

    assert live.client.get_run(live.run_id).info.status == "FAILED"
    assert live.client.search_model_versions(f"name = '{cfg.registry.model_name}'") == []


_KILLED_MID_REGISTRATION = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from loraops.registry import runs as registry
from loraops.registry import tracking, versions
from loraops.config import LoraopsConfig
from test_tracking import outcome

cfg = LoraopsConfig.model_validate_json(Path({config!r}).read_text())
root, adapter, marker = Path({root!r}), Path({adapter!r}), Path({marker!r})
live = tracking.start_run(cfg, root)
create_version = versions._create_version

def create_then_wait(*args, **kwargs):
    version = create_version(*args, **kwargs)
    marker.write_text(live.run_id)  # the version row exists; aliases and card are not set yet
    time.sleep(600)

versions._create_version = create_then_wait
registry.log_and_register(cfg, root=root, **outcome(root, adapter, live.run_id))
"""


@pytest.mark.slow
def test_a_rerun_after_a_sigkill_between_version_and_alias_finishes_that_one_version(cfg, tmp_path, adapter):
    config, marker = tmp_path / "config.json", tmp_path / "version-created"
    config.write_text(cfg.model_dump_json())
    script = _KILLED_MID_REGISTRATION.format(
        tests=str(TESTS), config=str(config), root=str(tmp_path), adapter=str(adapter), marker=str(marker)
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(
                    f"the registration exited with {process.returncode} early:\n{process.stderr.read()[-3000:]}"
                )
            assert time.monotonic() < deadline, "the registration never created its version"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_run = marker.read_text()
    client = client_for(cfg.registry, tmp_path)
    name = cfg.registry.model_name
    assert client.get_run(killed_run).info.status == "RUNNING"
    assert client.get_registered_model(name).aliases == {}

    live = tracking.start_run(cfg, tmp_path)  # the rerun retrains the same adapter (same seed, same bytes)
    registration = registry.log_and_register(cfg, root=tmp_path, **outcome(tmp_path, adapter, live.run_id))

    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert registration.version == "1"
    assert client.get_registered_model(name).aliases == {"challenger": 1}
    assert client.get_model_version(name, "1").description.startswith(f"# {name} version 1")
    assert client.get_run(killed_run).info.status == "FAILED"
    assert client.get_run(live.run_id).info.status == "FINISHED"


def test_orphans_of_the_same_adapter_end_failed_but_other_runs_stay(cfg, tmp_path):
    client = client_for(cfg.registry, tmp_path)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, None)
    orphan = client.create_run(experiment_id, tags={names.ADAPTER_KEY_TAG: "a" * 64}).info.run_id
    other = client.create_run(experiment_id, tags={names.ADAPTER_KEY_TAG: "b" * 64}).info.run_id
    current = client.create_run(experiment_id, tags={names.ADAPTER_KEY_TAG: "a" * 64}).info.run_id

    assert tracking.fail_orphans(client, experiment_id, names.ADAPTER_KEY_TAG, "a" * 64, keep=current) == [orphan]
    assert [client.get_run(run).info.status for run in (orphan, other, current)] == ["FAILED", "RUNNING", "RUNNING"]


def test_run_links_for_a_server_and_for_a_sqlite_store():
    assert tracking.run_url("https://bob:pw@mlflow.example.com/", "3", "abc") == (
        "https://mlflow.example.com/#/experiments/3/runs/abc"
    )
    assert tracking.run_url("sqlite:///tmp/mlflow.db", "3", "abc") is None
    described = tracking.describe_run("sqlite:///tmp/mlflow.db", "3", "abc")
    assert "abc" in described and "sqlite:///tmp/mlflow.db" in described


@pytest.mark.integration
def test_a_retried_training_in_the_same_flow_run_continues_in_its_run(tiny_project, prefect_harness):
    from prefect import flow

    @flow
    def train_twice(project: str):
        """As the train-adapter task's retry does: the first attempt crashes, the second trains."""
        root = Path(project)
        cfg = load_config(root / "params.yaml")
        stages.prepare_base_model(cfg, root)
        crash = _Watch(root, at_step=2, fail=True)
        with pytest.raises(RuntimeError, match="training crashed"):
            stages.train_adapter(cfg, root, callbacks=(crash,))
        first = crash.seen[0].info.run_id
        return first, _client(root).get_run(first).info.status, stages.train_adapter(cfg, root)

    first, status_after_crash, trained = train_twice(str(tiny_project))

    assert status_after_crash == "FAILED"
    assert trained.mlflow_run_id == first, "the retry continued in the same MLflow run"
    client = _client(tiny_project)
    run = client.get_run(first)
    assert run.info.status == "RUNNING"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [p.step for p in client.get_metric_history(first, "loss")][-1] == trained.steps


def test_the_adapter_key_follows_weights_and_config_not_tokenizer_files(tmp_path):
    from loraops.registry.adapter_hash import adapter_key

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    key = adapter_key(adapter)
    (adapter / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    assert adapter_key(adapter) == key
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert adapter_key(adapter) != key
    with pytest.raises(FileNotFoundError, match="no adapter_config.json or weight files"):
        adapter_key(tmp_path / "empty")
