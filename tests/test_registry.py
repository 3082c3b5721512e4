"""MLflow logging and registration against a real SQLite-backed store with artifacts in a temp dir.

One store serves the whole module (MLflow's first connection creates its tables, ~4 s); each
test registers under its own model and experiment name so tests stay independent.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import mlflow.artifacts
import numpy
import pytest
import safetensors.numpy
from mlflow.exceptions import MlflowException

from loraops.config import LoraopsConfig, RegistryConfig
from loraops.registry.mlflow_model import adapter_folder
from loraops.registry.runs import log_and_register
from loraops.registry.store import artifact_root_for, client_for, ensure_experiment, make_client, resolve_tracking_uri
from loraops.registry.values import flatten_params
from loraops.registry.versions import download_adapter, find_champion, promote_version, version_url
from loraops.results import EvalMetrics, GateDecision, Lineage, TrainResult

HISTORY = [
    {"loss": 2.6, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.5, "step": 10},
    {"eval_loss": 2.3, "eval_runtime": 0.4, "epoch": 0.5, "step": 10},
    {"loss": 2.1, "grad_norm": 1.1, "learning_rate": 5e-4, "epoch": 1.0, "step": 20},
    {"eval_loss": 2.013, "eval_runtime": 0.4, "epoch": 1.0, "step": 20},
    {"train_runtime": 12.5, "train_loss": 2.35, "epoch": 1.0, "step": 20},
]
ADAPTER_FILES = {
    "adapter_config.json": b'{"r": 16, "lora_alpha": 32}',
    "adapter_model.safetensors": safetensors.numpy.save({"w": numpy.random.default_rng().random(512, numpy.float32)}),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("mlflow-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    make_client(uri).search_experiments()  # create the tables once
    return uri, root


pytestmark = pytest.mark.usefixtures("away_from_the_checkout")


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder with a fake adapter (two small files), trainer history and lineage files."""
    adapter = tmp_path / "adapters" / "candidate"
    adapter.mkdir(parents=True)
    for name, content in ADAPTER_FILES.items():
        (adapter / name).write_bytes(content)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "history.json").write_text(json.dumps(HISTORY))
    (tmp_path / "params.yaml").write_text("lora:\n  r: 16\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "data_contract_summary.json").write_text('{"passed": true}\n')
    return tmp_path


@pytest.fixture
def cfg(store) -> LoraopsConfig:
    name = f"adapter-{uuid.uuid4().hex[:8]}"
    return LoraopsConfig(registry={"tracking_uri": store[0], "model_name": name, "experiment": f"exp-{name}"})


@pytest.fixture
def client(store):
    return make_client(store[0])


def metrics(loss: float) -> EvalMetrics:
    return EvalMetrics(loss=loss, perplexity=math.exp(loss), tokens=1234, examples=64)


def outcome(passed: bool = True, candidate: float = 2.013, data_md5: str = "a" * 32 + ".dir") -> dict:
    """What the stages hand to log_and_register, as keyword arguments."""
    reasons = [f"validation loss {candidate:.3f} vs base 2.802: {'improved' if passed else 'worse'}"]
    return dict(
        trained=TrainResult(
            adapter_dir="adapters/candidate",
            trainable_params=1_000,
            total_params=100_000,
            steps=20,
            best_step=20,
            best_eval_loss=2.013,
            stopped_early=False,
            history_path="metrics/history.json",
        ),
        baseline=metrics(2.802),
        candidate=metrics(candidate),
        decision=GateDecision(passed=passed, reasons=reasons, baseline_loss=2.802, candidate_loss=candidate),
        lineage=Lineage(
            git_commit="0123456789abcdef",
            git_dirty=False,
            data_md5=data_md5,
            dvc_lock_md5="b" * 32,
            params_hash="c" * 16,
            base_model="tiny-llama",
            base_revision="main",
        ),
    )


LINEAGE_EXTRAS = ["params.yaml", "dvc.lock", "reports/data_contract_summary.json"]


def test_passing_gate_registers_version_with_tags_description_and_challenger(cfg, project, client):
    registration = log_and_register(cfg, root=project, **outcome(), extra_files=LINEAGE_EXTRAS, client=client)

    name = cfg.registry.model_name
    assert (registration.model_name, registration.version, registration.aliases) == (name, "1", ["challenger"])
    version = client.get_model_version(name, "1")
    assert version.run_id == registration.run_id
    assert version.tags["loraops.val_loss"] == "2.013"
    assert version.tags["loraops.data_md5"] == "a" * 32 + ".dir"
    assert version.tags["loraops.base_model"] == "tiny-llama"
    assert version.tags["loraops.git_commit"] == "0123456789abcdef"
    assert "vs base 2.802" in version.tags["loraops.gate.reasons"]
    assert "validation loss 2.013 (base 2.802)" in version.description
    assert client.get_registered_model(name).aliases == {"challenger": 1}
    assert find_champion(client, name) is None, "without auto_promote the champion alias is not set"


def test_run_holds_params_step_metrics_gate_and_artifacts(cfg, project, client, store):
    registration = log_and_register(cfg, root=project, **outcome(), extra_files=LINEAGE_EXTRAS, client=client)

    run = client.get_run(registration.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((store[1] / "artifacts").as_uri()), "artifacts live next to the db"
    assert run.data.params["lora.r"] == "16"
    assert run.data.params["lora.target_modules"] == "all-linear"
    assert run.data.metrics["adapter_val_loss"] == 2.013
    assert run.data.metrics["baseline_val_loss"] == 2.802
    assert run.data.metrics["trainable_params"] == 1_000
    eval_history = client.get_metric_history(registration.run_id, "eval_loss")
    assert sorted((point.step, point.value) for point in eval_history) == [(10, 2.3), (20, 2.013)]
    assert [point.step for point in client.get_metric_history(registration.run_id, "loss")] == [10, 20]
    assert run.data.tags["loraops.gate"] == "passed"
    assert run.data.tags["loraops.params_hash"] == "c" * 16
    listed = {item.path for item in client.list_artifacts(registration.run_id)}
    assert {"adapter", "gate.json", "lineage", "training"} <= listed
    lineage_files = {item.path for item in client.list_artifacts(registration.run_id, "lineage")}
    assert lineage_files == {"lineage/params.yaml", "lineage/dvc.lock"}
    reports = {item.path for item in client.list_artifacts(registration.run_id, "reports")}
    assert reports == {"reports/data_contract_summary.json"}


def test_failed_gate_logs_run_but_registers_nothing(cfg, project, client):
    registration = log_and_register(cfg, root=project, **outcome(passed=False, candidate=2.9), client=client)

    assert registration.version is None
    assert registration.aliases == []
    run = client.get_run(registration.run_id)
    assert run.data.tags["loraops.gate"] == "failed"
    assert "worse" in run.data.tags["loraops.gate.reasons"]
    gate = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="gate.json", tracking_uri=cfg.registry.tracking_uri
            )
        ).read_text()
    )
    assert gate["passed"] is False
    with pytest.raises(MlflowException) as missing:
        client.get_registered_model(cfg.registry.model_name)
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"


@pytest.mark.parametrize("run_key", ["flow-run-42", None], ids=["explicit-key", "derived-key"])
def test_retry_reuses_the_run_and_the_version(cfg, project, client, run_key):
    first = log_and_register(cfg, root=project, **outcome(), run_key=run_key, client=client)
    again = log_and_register(cfg, root=project, **outcome(), run_key=run_key, client=client)

    assert again == first
    assert len(client.search_model_versions(f"name = '{cfg.registry.model_name}'")) == 1
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_retry_after_a_crash_mid_logging_replaces_the_partial_run(cfg, project, client):
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(cfg.registry.tracking_uri))
    partial = client.create_run(experiment_id, tags={"loraops.run_key": "flow-run-7"})  # never terminated

    registration = log_and_register(cfg, root=project, **outcome(), run_key="flow-run-7", client=client)

    assert registration.run_id != partial.info.run_id
    assert client.get_run(partial.info.run_id).info.lifecycle_stage == "deleted"
    assert [run.info.run_id for run in client.search_runs([experiment_id])] == [registration.run_id]


def test_the_same_adapter_is_one_version_whatever_the_timings_and_lineage_around_it(cfg, project, client):
    first = log_and_register(cfg, root=project, **outcome(), client=client)
    # A rerun with a new dvc.lock (train runtime differs) and another measured loss: same adapter bytes.
    rerun = outcome(candidate=2.0)
    rerun["lineage"] = rerun["lineage"].model_copy(update={"dvc_lock_md5": "9" * 32})
    again = log_and_register(cfg, root=project, **rerun, client=client)

    assert again.run_id != first.run_id and again.version == first.version == "1"
    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    from loraops.registry.adapter_hash import adapter_key

    assert versions[0].tags["loraops.adapter_key"] == adapter_key(project / "adapters" / "candidate")


def test_auto_promote_sets_champion_and_find_champion_reads_its_tags(cfg, project, client):
    cfg.registry.auto_promote = True

    registration = log_and_register(cfg, root=project, **outcome(), client=client)

    assert registration.aliases == ["challenger", "champion"]
    champion = find_champion(client, cfg.registry.model_name)
    assert champion is not None
    assert (champion.version, champion.loss) == ("1", 2.013)
    assert (champion.data_md5, champion.base_model) == ("a" * 32 + ".dir", "tiny-llama")
    assert champion.adapter_uri == client.get_model_version(cfg.registry.model_name, "1").source


def test_a_second_version_becomes_challenger_until_promoted(cfg, project, client):
    log_and_register(cfg, root=project, **outcome(), client=client)
    promote_version(client, cfg.registry.model_name, "1")

    (project / "adapters" / "candidate" / "adapter_model.safetensors").write_bytes(os.urandom(2048))  # another adapter
    second = log_and_register(cfg, root=project, **outcome(candidate=1.9), client=client)

    aliases = client.get_registered_model(cfg.registry.model_name).aliases
    assert second.version == "2"
    assert aliases == {"champion": 1, "challenger": 2}
    promote_version(client, cfg.registry.model_name, "2")
    assert find_champion(client, cfg.registry.model_name).loss == 1.9


def test_find_champion_is_none_without_model_or_alias(cfg, client):
    assert find_champion(client, cfg.registry.model_name) is None
    client.create_registered_model(cfg.registry.model_name)
    assert find_champion(client, cfg.registry.model_name) is None


def test_champion_adapter_downloads_by_source_and_by_alias_uri(cfg, project, client, tmp_path, monkeypatch):
    cfg.registry.auto_promote = True
    log_and_register(cfg, root=project, **outcome(), client=client)
    champion = find_champion(client, cfg.registry.model_name)

    by_source = download_adapter(client, cfg.registry.model_name, champion, tmp_path / "a")
    # A consumer resolves models:/NAME@champion through its environment's registry URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.registry.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", cfg.registry.tracking_uri)
    by_alias = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{cfg.registry.model_name}@champion", dst_path=str(tmp_path / "b")
        )
    )

    assert (by_alias / "MLmodel").is_file(), "the version is an MLflow model"
    for folder in (by_source, adapter_folder(by_alias)):
        assert {path.name: path.read_bytes() for path in folder.iterdir()} == ADAPTER_FILES


def test_client_for_and_version_url(cfg, project):
    registration = log_and_register(cfg, root=project, **outcome(), client=client_for(cfg.registry, project))

    assert version_url(cfg.registry, project, registration) == f"models:/{cfg.registry.model_name}/1"
    served = RegistryConfig(tracking_uri="http://127.0.0.1:5000/")
    assert version_url(served, project, registration) == (
        f"http://127.0.0.1:5000/#/models/{cfg.registry.model_name}/versions/1"
    )
    failed = registration.model_copy(update={"version": None})
    assert version_url(served, project, failed) == f"http://127.0.0.1:5000/#/runs/{registration.run_id}"


def test_missing_adapter_fails_before_any_run_is_created(cfg, project, client):
    (project / "adapters" / "candidate" / "adapter_config.json").unlink()
    (project / "adapters" / "candidate" / "adapter_model.safetensors").unlink()

    with pytest.raises(FileNotFoundError, match="adapter folder .* missing or empty"):
        log_and_register(cfg, root=project, **outcome(), client=client)

    assert client.get_experiment_by_name(cfg.registry.experiment) is None


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(RegistryConfig(), tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert artifact_root_for(default) == (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(RegistryConfig(), tmp_path) == "http://127.0.0.1:5000"
    assert artifact_root_for("http://127.0.0.1:5000") is None, "a server chooses its own artifact store"
    assert resolve_tracking_uri(RegistryConfig(tracking_uri="sqlite:///x.db"), tmp_path) == "sqlite:///x.db"


def test_params_are_flat_and_carry_no_credentials():
    cfg = LoraopsConfig(registry={"tracking_uri": "https://alice:s3cret@mlflow.example.com/"})

    params = flatten_params(cfg.model_dump(mode="json"))

    assert params["lora.r"] == "16"
    assert params["train.learning_rate"] == "0.0002"
    assert params["registry.tracking_uri"] == "https://***@mlflow.example.com/"
    assert not any("s3cret" in value for value in params.values())


def test_a_deleted_experiment_is_reported_not_silently_restored(cfg, client):
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(cfg.registry.tracking_uri))
    client.delete_experiment(experiment_id)

    with pytest.raises(MlflowException, match="is deleted: restore it"):
        ensure_experiment(client, cfg.registry.experiment, None)
