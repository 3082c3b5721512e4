"""Warm start (``train.init_from: champion``) on the tiny model with a real SQLite MLflow store.

Training starts from the champion's adapter weights (checked as training begins), the version is
recorded as ``loraops.init_from`` on the run and the version it becomes; a champion of another shape,
another base, or none at all is refused before any run opens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import dvc_changes
from registry_helpers import make_adapter, register
from safetensors.torch import load_file

from loraops import names, stages
from loraops.config import ConfigError
from loraops.project.params_file import load_config
from loraops.registry.integrity import file_sha256
from loraops.registry.runs import log_and_register
from loraops.registry.store import make_client
from loraops.registry.versions import promote_version
from loraops.reproduce.recorded import RecordedVersion, ReproduceError, check_reproducible
from loraops.results import BaseModelRef, EvalMetrics, GateDecision, Lineage
from loraops.train.checkpoints import run_fingerprint


class _StartingWeights:
    """Keeps the adapter's weights as the trainer hands the model over, before the first step."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] | None = None
        self.dropouts: set[float] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict

        self.tensors = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
        self.dropouts = {
            getattr(module, "p", 0.0) for name, module in model.named_modules() if name.endswith("lora_dropout.default")
        }

    def __getattr__(self, name):  # the other TrainerCallback hooks do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _config(project: Path, store_uri: str, **overrides):
    name = f"warm-{uuid.uuid4().hex[:8]}"
    settings = {
        "registry.tracking_uri": store_uri,
        "registry.model_name": name,
        "registry.experiment": f"exp-{name}",
        "lora.r": 4,
        "lora.alpha": 8,
        "train.init_from": "champion",
        "train.max_steps": 2,
        "train.eval_steps": 2,
        **overrides,
    }
    return load_config(project / "params.yaml", settings)


def _champion(
    cfg, project: Path, tiny_model_dir: Path, base_model: str | None = None, seed: int = 3
) -> tuple[str, Path]:
    """Register a small real adapter (r=4, alpha=8, all-linear) and make it the champion."""
    adapter = make_adapter(tiny_model_dir, project.parent / f"champion-{uuid.uuid4().hex[:6]}", seed=seed)
    registration = register(cfg, project, adapter, base_model or cfg.model.base)
    promote_version(make_client(cfg.registry.tracking_uri), cfg.registry.model_name, registration.version)
    return registration.version, adapter


def _runs(cfg) -> list:
    client = make_client(cfg.registry.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [run for run in runs if not run.data.tags.get(names.RUN_KEY_TAG)]  # training runs, not the champion's


def test_training_starts_from_the_champions_weights_and_records_the_version(tiny_project, tiny_model_dir, store_uri):
    cfg = _config(tiny_project, store_uri)
    version, champion_dir = _champion(cfg, tiny_project, tiny_model_dir)
    stages.prepare_base_model(cfg, tiny_project)
    start = _StartingWeights()

    trained = stages.train_adapter(cfg, tiny_project, callbacks=(start,))

    champion = load_file(champion_dir / "adapter_model.safetensors")
    assert start.tensors is not None and start.tensors.keys() == champion.keys()
    for key, tensor in champion.items():
        assert torch.equal(start.tensors[key], tensor), f"{key} did not start at the champion's value"
    assert start.dropouts == {cfg.lora.dropout}, "this run's lora.dropout, not the champion's (0.0)"
    after = load_file(Path(trained.adapter_dir) / "adapter_model.safetensors")
    assert any(not torch.equal(after[key], champion[key]) for key in champion), "training changed nothing"
    label = f"{cfg.registry.model_name}/{version}"
    assert trained.init_from == label
    client = make_client(store_uri)
    assert client.get_run(trained.mlflow_run_id).data.tags[names.INIT_FROM_TAG] == label
    assert "init_from" not in trained.metrics(), "metrics/train.json holds numbers only"

    registration = log_and_register(
        cfg,
        root=tiny_project,
        trained=trained,
        baseline=EvalMetrics.from_totals(300.0, 100, 4),
        candidate=EvalMetrics.from_totals(200.0, 100, 4),
        decision=GateDecision(passed=True, reasons=["better"], baseline_loss=3.0, candidate_loss=2.0),
        lineage=Lineage(
            git_commit="0" * 40,
            git_dirty=False,
            data_md5="d" * 32,
            dvc_lock_md5="e" * 32,
            params_hash="f" * 16,
            base_model=cfg.model.base,
        ),
    )
    new = client.get_model_version(cfg.registry.model_name, registration.version)
    assert registration.version != version and new.tags[names.INIT_FROM_TAG] == label
    assert client.get_run(registration.run_id).data.tags[names.INIT_FROM_TAG] == label

    recorded = RecordedVersion(
        model_name=new.name,
        version=str(new.version),
        run_id=new.run_id,
        adapter_uri=new.source,
        tags=dict(new.tags),
        lock_text="",
        params_text="",
    )
    with pytest.raises(ReproduceError, match=f"warm-started from {label}.*not supported yet"):
        check_reproducible(recorded, tiny_project, allow_dirty=True)  # it would start from today's champion


def test_a_champion_of_another_rank_is_refused_before_training(tiny_project, tiny_model_dir, store_uri):
    cfg = _config(tiny_project, store_uri, **{"lora.r": 16})
    version, _ = _champion(cfg, tiny_project, tiny_model_dir)
    stages.prepare_base_model(cfg, tiny_project)

    with pytest.raises(ConfigError) as refused:
        stages.train_adapter(cfg, tiny_project)

    message = str(refused.value)
    assert f"({cfg.registry.model_name}/{version}) has lora.r 4, this run 16" in message
    assert "set lora.r=4 or train.init_from=null" in message
    assert _runs(cfg) == [] and not (tiny_project / cfg.paths.adapter_dir).exists()


def test_a_champion_on_another_base_model_is_refused(tiny_project, tiny_model_dir, store_uri):
    cfg = _config(tiny_project, store_uri)
    _champion(cfg, tiny_project, tiny_model_dir, base_model="HuggingFaceTB/SmolLM2-360M")
    stages.prepare_base_model(cfg, tiny_project)

    with pytest.raises(ConfigError, match="has model.base HuggingFaceTB/SmolLM2-360M, this run .*: set model.base="):
        stages.train_adapter(cfg, tiny_project)
    assert _runs(cfg) == []


def test_without_a_champion_the_run_is_refused_saying_how_to_proceed(tiny_project, tiny_model_dir, store_uri):
    cfg = _config(tiny_project, store_uri)
    register(cfg, tiny_project, make_adapter(tiny_model_dir, tiny_project.parent / "only", seed=1), cfg.model.base)
    stages.prepare_base_model(cfg, tiny_project)  # a version exists, but no alias champion points at it

    with pytest.raises(ConfigError) as refused:
        stages.train_adapter(cfg, tiny_project)

    message = str(refused.value)
    assert f"{cfg.registry.model_name!r} has no champion" in message
    assert "train.init_from=null" in message and "loraops promote" in message
    assert _runs(cfg) == [] and not (tiny_project / cfg.paths.adapter_dir).exists()


def test_the_resume_fingerprint_counts_the_starting_adapters_content(tmp_path, tiny_project):
    cfg = load_config(tiny_project / "params.yaml")
    base = BaseModelRef(source="tiny", path="tiny")
    data = {"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]}
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, content in ((first, b"one"), (second, b"two")):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(content)

    fresh = run_fingerprint(cfg, base, data, data, "cpu")
    from_first = run_fingerprint(cfg, base, data, data, "cpu", first)
    assert from_first == run_fingerprint(cfg, base, data, data, "cpu", first), "a rerun resumes its checkpoints"
    assert len({fresh, from_first, run_fingerprint(cfg, base, data, data, "cpu", second)}) == 3


def test_init_from_accepts_champion_or_nothing(tiny_project):
    assert load_config(tiny_project / "params.yaml").train.init_from is None
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(tiny_project / "params.yaml", {"train.init_from": "latest"})


@pytest.mark.slow
def test_retrain_warm_starts_from_the_champion_and_dvc_sees_the_setting(tiny_project, prefect_harness):
    """Two retrain flows: the first makes v1 the champion, the second continues from it (a params change for DVC)."""
    from dvc.repo import Repo

    from flows.retrain import retrain
    from loraops.project.params_file import write_params

    first = retrain(
        config=load_config(tiny_project / "params.yaml", {"registry.auto_promote": True}), project_dir=str(tiny_project)
    )
    assert first.registration.version == "1"
    warm = load_config(tiny_project / "params.yaml", {"train.init_from": "champion"})
    write_params(warm, tiny_project / "params.yaml")
    with Repo(str(tiny_project)) as repo:
        changed = {key.rsplit(":", 1)[-1] for key in repo.status()}
    assert "train_adapter" in changed, f"train.init_from changed, dvc status reports {sorted(changed)}"

    second = retrain(config=warm, project_dir=str(tiny_project), force=True)

    run = make_client(f"sqlite:///{tiny_project}/mlflow/mlflow.db").get_run(second.registration.run_id)
    assert run.data.tags[names.INIT_FROM_TAG] == f"{warm.registry.model_name}/1"
    with Repo(str(tiny_project)) as repo:
        assert not dvc_changes(repo.status()), "dvc.lock records the warm-started run"


def test_a_mismatching_champion_stops_the_retrain_flow_before_the_baseline(
    tiny_project, tiny_model_dir, store_uri, prefect_harness
):
    """The pre-flight refuses it with training's own message, before any model is loaded or evaluated."""
    from flows.retrain import retrain

    cfg = _config(tiny_project, store_uri, **{"lora.r": 16})
    version, _ = _champion(cfg, tiny_project, tiny_model_dir)
    params_before = (tiny_project / "params.yaml").read_bytes()

    with pytest.raises(ConfigError, match=rf"\({cfg.registry.model_name}/{version}\) has lora.r 4, this run 16"):
        retrain(config=cfg, project_dir=str(tiny_project))

    assert not (tiny_project / cfg.paths.metrics_dir / names.BASELINE_METRICS).exists(), "no baseline evaluated"
    assert not (tiny_project / cfg.paths.base_model_dir).exists(), "no base model prepared"
    assert _runs(cfg) == [], "no training run opened, no baseline metric logged"
    assert (tiny_project / "params.yaml").read_bytes() == params_before


def _record(cfg, project: Path) -> dict:
    return json.loads((project / cfg.paths.reports_dir / names.INIT_ADAPTER_RECORD).read_text())


def test_the_resolved_init_adapter_changes_only_with_the_champion(tiny_project, tiny_model_dir, store_uri):
    cfg = _config(tiny_project, store_uri)
    version, champion_dir = _champion(cfg, tiny_project, tiny_model_dir)

    first = stages.resolve_init_adapter(cfg, tiny_project)
    assert (first.model_name, first.version) == (cfg.registry.model_name, version)
    assert first.adapter_sha256["adapter_model.safetensors"] == file_sha256(champion_dir / "adapter_model.safetensors")
    recorded = _record(cfg, tiny_project)
    assert stages.resolve_init_adapter(cfg, tiny_project) == first and _record(cfg, tiny_project) == recorded

    newer, _ = _champion(cfg, tiny_project, tiny_model_dir, seed=4)
    assert _record(cfg, tiny_project) == recorded, "promotion alone writes nothing into the checkout"
    stages.resolve_init_adapter(cfg, tiny_project)
    assert _record(cfg, tiny_project)["version"] == newer != version

    fresh = load_config(tiny_project / "params.yaml", {"registry.tracking_uri": "http://127.0.0.1:9/unreachable"})
    assert stages.resolve_init_adapter(fresh, tiny_project).init_from is None  # no init_from: no registry asked
    assert _record(fresh, tiny_project) == {
        "adapter_sha256": None,
        "init_from": None,
        "model_name": None,
        "version": None,
    }


@pytest.mark.slow  # dvc repro of four stages on the tiny project: ~1-2 min on 2 busy cores
def test_dvc_status_reports_the_train_stage_after_a_new_champion_and_not_otherwise(
    tiny_project, tiny_model_dir, store_uri
):
    from dvc.repo import Repo

    from loraops.project.params_file import write_params

    cfg = _config(tiny_project, store_uri)
    write_params(cfg, tiny_project / "params.yaml")  # init_from: champion, recorded where dvc reads it
    first, _ = _champion(cfg, tiny_project, tiny_model_dir)
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro"]
    subprocess.run([*dvc, "train_adapter"], cwd=tiny_project, check=True, capture_output=True, text=True)
    assert _record(cfg, tiny_project)["version"] == first

    def changed_after_resolving() -> set[str]:
        subprocess.run([*dvc, "resolve_init_adapter"], cwd=tiny_project, check=True, capture_output=True, text=True)
        with Repo(str(tiny_project)) as repo:
            return {key.rsplit(":", 1)[-1] for key in dvc_changes(repo.status())}

    assert "train_adapter" not in changed_after_resolving(), "the same champion: nothing to retrain"
    second, _ = _champion(cfg, tiny_project, tiny_model_dir, seed=4)
    assert "train_adapter" in changed_after_resolving(), f"champion v{first} -> v{second}: dvc must retrain"
    assert _record(cfg, tiny_project)["version"] == second
