"""Swapped or corrupt adapter files are never loaded, served, promoted, exported or compared.

Two tiny versions in a real SQLite MLflow store; version 1's ``adapter_model.safetensors`` is then
changed in the store's artifact folder on disk (version 2's file copied over it, or random bytes),
and every load path must refuse it with a message naming model, version and file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from registry_helpers import PROMPT, make_adapter, register, registry_config
from typer.testing import CliRunner

from loraops import names, stages
from loraops.names import ADAPTER_SHA256_TAG
from loraops.registry import integrity, promotion
from loraops.registry.fetch import fetch_adapter
from loraops.registry.integrity import AdapterIntegrityError
from loraops.registry.mlflow_model import adapter_folder
from loraops.registry.store import make_client, resolve_tracking_uri
from loraops.registry.versions import CHAMPION, promote_version
from loraops.reproduce.recorded import RecordedVersion, ReproduceError, download_registered_adapter
from loraops.results import EvalMetrics, GateDecision, Lineage, TrainResult
from loraops.train.adapters import load_adapter
from loraops.train.generate import generate_text

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, folder / f"a{seed}", seed) for seed in (1, 2)]


pytestmark = pytest.mark.usefixtures("away_from_the_checkout")


@pytest.fixture
def project(store_uri, adapters, tiny_model_dir, tmp_path):
    """Versions 1 and 2 registered; champion 2, previous 1, and alias ``staging`` on 1."""
    cfg = registry_config(store_uri, tmp_path)
    client = make_client(store_uri)
    for adapter in adapters:
        register(cfg, tmp_path, adapter, str(tiny_model_dir), client=client)
    name = cfg.registry.model_name
    for version, alias in (("1", promotion.PREVIOUS), ("2", CHAMPION), ("1", "staging")):
        promote_version(client, name, version, alias)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return cfg, params, client


def stored_file(client, name: str, version: str, file: str = WEIGHTS) -> Path:
    """The file as the artifact store holds it on disk (what a swap or a bad disk changes)."""
    registered = client.get_model_version(name, version)
    if registered.source.startswith("models:/"):  # an MLflow model: the adapter is under its artifacts/
        location = client.get_logged_model(registered.source.removeprefix("models:/")).artifact_location
        model_dir = Path(unquote(urlparse(location).path))
        return adapter_folder(model_dir) / file
    return Path(unquote(urlparse(registered.source).path)) / file


def swap_in_version_2(client, name: str) -> str:
    shutil.copyfile(stored_file(client, name, "2"), stored_file(client, name, "1"))
    return "adapter_model.safetensors differs from the sha256 recorded at registration"


def random_bytes(client, name: str) -> str:
    target = stored_file(client, name, "1")
    target.write_bytes(os.urandom(target.stat().st_size))
    return "adapter_model.safetensors differs from the sha256 recorded at registration"


def _cli(*args: str) -> str:
    from loraops.cli.app import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception), "a clean exit, not an escaped exception"
    assert "Traceback" not in result.output
    return result.output


# --- every load path ----------------------------------------------------------------------------


def generate(cfg, params, client, tmp_path) -> str:
    return _cli("generate", "-p", str(params), "-m", f"models:/{cfg.registry.model_name}@staging", PROMPT)


def export(cfg, params, client, tmp_path) -> str:
    output = _cli("export", cfg.registry.model_name, "1", "--merged", str(tmp_path / "merged"), "-p", str(params))
    assert not (tmp_path / "merged").exists(), "nothing exported"
    return output


def promote(cfg, params, client, tmp_path) -> str:
    name = cfg.registry.model_name
    output = _cli("promote", name, "1", "--force", "--reason", "try anyway", "-p", str(params))
    assert client.get_registered_model(name).aliases[CHAMPION] == 2, "--force does not promote changed files"
    assert names.PROMOTION_FORCED_TAG not in client.get_model_version(name, "1").tags
    return output


def rollback(cfg, params, client, tmp_path) -> str:
    output = _cli("rollback", cfg.registry.model_name, "-p", str(params))
    assert client.get_registered_model(cfg.registry.model_name).aliases[CHAMPION] == 2
    return output


def gate_champion(cfg, params, client, tmp_path) -> str:
    """The gate re-evaluates a champion measured on other data: it downloads the champion first."""
    promote_version(client, cfg.registry.model_name, "1", CHAMPION)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    metrics = EvalMetrics.from_totals(150.0, 100, 4)
    with pytest.raises(AdapterIntegrityError) as refused:
        stages.gate_candidate(cfg, tmp_path, metrics, metrics)
    assert not (tmp_path / cfg.paths.metrics_dir / names.GATE_DECISION).exists(), "no gate decision recorded"
    return str(refused.value)


def reproduce_comparison(cfg, params, client, tmp_path) -> str:
    version = client.get_model_version(cfg.registry.model_name, "1")
    recorded = RecordedVersion(
        model_name=version.name,
        version="1",
        run_id=version.run_id,
        adapter_uri=version.source,
        tags=dict(version.tags),
        lock_text="",
        params_text="",
    )
    with pytest.raises(ReproduceError) as refused:
        download_registered_adapter(client, recorded, tmp_path / "registered")
    return str(refused.value)


LOAD_PATHS = [generate, export, promote, rollback, gate_champion, reproduce_comparison]


@pytest.mark.parametrize("corrupt", [swap_in_version_2, random_bytes], ids=["swapped", "random-bytes"])
@pytest.mark.parametrize("load", LOAD_PATHS, ids=[path.__name__ for path in LOAD_PATHS])
def test_changed_weights_are_refused_naming_model_version_and_file(project, tmp_path, load, corrupt):
    cfg, params, client = project
    expected = corrupt(client, cfg.registry.model_name)

    message = " ".join(load(cfg, params, client, tmp_path).split())  # the CLI wraps long lines

    assert f"{cfg.registry.model_name} version 1: {expected}" in message
    assert "dvc pull" in message and "no override" in message


def test_version_2_itself_still_loads_after_version_1_was_changed(project, tmp_path):
    cfg, _, client = project
    swap_in_version_2(client, cfg.registry.model_name)

    source = fetch_adapter(cfg, tmp_path, f"models:/{cfg.registry.model_name}@{CHAMPION}", tmp_path / "downloads")

    assert source.version == "2"


# --- what registration records ------------------------------------------------------------------


def test_registration_records_the_sha256_of_every_adapter_file(project, adapters):
    cfg, _, client = project
    import hashlib

    for version, adapter in zip(("1", "2"), adapters):
        recorded = json.loads(client.get_model_version(cfg.registry.model_name, version).tags[ADAPTER_SHA256_TAG])
        on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir() if p.is_file()}
        assert recorded == on_disk
        assert {WEIGHTS, "adapter_config.json"} <= recorded.keys()


def test_missing_and_added_files_are_named():
    recorded = {"adapter_config.json": "a" * 64, WEIGHTS: "b" * 64}
    problems = integrity.digest_problems(recorded, {WEIGHTS: "b" * 64, "adapter_model.bin": "c" * 64})
    assert problems == [
        "adapter_config.json is missing (it was registered with sha256 aaaaaaaaaaaa…)",
        "adapter_model.bin was not part of the adapter when it was registered",
    ]


def test_an_edited_hash_tag_is_refused(project, tmp_path):
    cfg, _, client = project
    client.set_model_version_tag(cfg.registry.model_name, "1", ADAPTER_SHA256_TAG, "not json")
    with pytest.raises(AdapterIntegrityError, match="version 1: its loraops.adapter_sha256 tag is not a JSON map"):
        fetch_adapter(cfg, tmp_path, f"models:/{cfg.registry.model_name}/1", tmp_path / "downloads")


# --- versions registered before hashes were recorded --------------------------------------------


def test_a_version_without_hashes_loads_with_a_warning_and_unreadable_weights_are_still_refused(
    project, adapters, tiny_model_dir, tmp_path, caplog
):
    cfg, params, client = project
    name = cfg.registry.model_name
    original = client.get_model_version(name, "1")
    old_tags = {key: value for key, value in original.tags.items() if key != ADAPTER_SHA256_TAG}
    plain_folder = f"{client.get_run(original.run_id).info.artifact_uri}/adapter"  # as versions were registered before
    old = str(client.create_model_version(name, plain_folder, run_id=original.run_id, tags=old_tags).version)

    with caplog.at_level("WARNING", logger="loraops.registry.integrity"):
        source = fetch_adapter(cfg, tmp_path, f"models:/{name}/{old}", tmp_path / "downloads")
    warnings = [r.getMessage() for r in caplog.records if r.name == "loraops.registry.integrity"]
    assert warnings == [
        f"{name} version {old} carries no content hashes (no {ADAPTER_SHA256_TAG} tag: made before "
        "loraops recorded them)"
    ]
    answer = generate_text(*load_adapter(source, cfg.model, "cpu"), PROMPT, 8)
    from loraops.results import BaseModelRef
    from loraops.train.adapters import AdapterSource

    local = AdapterSource("local", adapters[0], BaseModelRef(source="tiny", path=str(tiny_model_dir)), cfg.quant)
    assert answer == generate_text(*load_adapter(local, cfg.model, "cpu"), PROMPT, 8)

    target = stored_file(client, name, old)
    target.write_bytes(os.urandom(target.stat().st_size))
    output = " ".join(_cli("generate", "-p", str(params), "-m", f"models:/{name}/{old}", PROMPT).split())
    assert f"{name} version {old}: adapter_model.safetensors is not a readable safetensors file" in output


def test_a_corrupt_local_adapter_folder_is_refused_cleanly(adapters, tmp_path, project):
    cfg, params, _ = project
    folder = tmp_path / "local-adapter"
    shutil.copytree(adapters[0], folder)
    (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:-16])  # truncated

    output = " ".join(_cli("generate", "-p", str(params), "-m", str(folder), PROMPT).split())

    assert f"{folder}: adapter_model.safetensors is not a readable safetensors file" in output


# --- the workspace adapter against dvc.lock -----------------------------------------------------


def _dvc_project(root: Path, adapter: Path) -> Path:
    """A real git + DVC repo whose dvc.lock records adapters/candidate (as version_outputs leaves it)."""
    from loraops.lineage.versioning import record_pipeline_state

    root.mkdir()
    run = lambda *args: subprocess.run(args, cwd=root, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (root / "dvc.yaml").write_text(
        "stages:\n  train_adapter:\n    cmd: 'true'\n    outs:\n      - adapters/candidate\n"
    )
    shutil.copytree(adapter, root / "adapters" / "candidate")
    record_pipeline_state(root, ["train_adapter"])
    return root


def test_registration_refuses_a_workspace_adapter_that_differs_from_dvc_lock(project, adapters, tmp_path):
    cfg, _, client = project
    root = _dvc_project(tmp_path / "dvc-project", adapters[0])
    cfg = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"model_name": "ws-" + cfg.registry.model_name})}
    )
    integrity.check_workspace_adapter(root, cfg.paths.adapter_dir)  # as recorded: passes
    shutil.copyfile(adapters[1] / WEIGHTS, root / "adapters" / "candidate" / WEIGHTS)
    (root / "history.json").write_text("[]")
    trained = TrainResult(
        adapter_dir=str(root / "adapters" / "candidate"),
        trainable_params=1,
        total_params=2,
        steps=1,
        best_step=1,
        best_eval_loss=1.0,
        stopped_early=False,
        history_path=str(root / "history.json"),
    )
    metrics = EvalMetrics.from_totals(150.0, 100, 4)
    decision = GateDecision(passed=True, reasons=["ok"], baseline_loss=1.5, candidate_loss=1.5)
    lineage = Lineage(
        git_commit="0" * 40,
        git_dirty=False,
        data_md5="d" * 32,
        dvc_lock_md5="e" * 32,
        params_hash="f" * 16,
        base_model="tiny",
    )

    with pytest.raises(AdapterIntegrityError) as refused:
        stages.register_adapter(cfg, root, trained, metrics, metrics, decision, lineage)

    message = str(refused.value)
    assert "adapters/candidate differs from what" in message and "[changed: adapter_model.safetensors]" in message
    assert "Nothing was registered" in message and "dvc checkout adapters/candidate" in message
    assert not client.search_registered_models(f"name = '{cfg.registry.model_name}'"), "nothing registered"


# --- the training hand-off ----------------------------------------------------------------------


def test_the_hand_off_fetch_refuses_an_adapter_changed_after_the_worker_published_it(tiny_project, adapters):
    from loraops.project.params_file import load_config
    from loraops.registry import handoff

    cfg = load_config(tiny_project / "params.yaml")
    history = tiny_project / "history.json"
    history.write_text(json.dumps([{"loss": 2.0, "step": 1}]))
    trained = TrainResult(
        adapter_dir=str(adapters[0]),
        trainable_params=1,
        total_params=2,
        steps=1,
        best_step=1,
        best_eval_loss=1.0,
        stopped_early=False,
        history_path=str(history),
    )
    run_id = handoff.publish_training(cfg, tiny_project, trained, "key-1")
    client = make_client(resolve_tracking_uri(cfg.registry, tiny_project))
    stored = Path(unquote(urlparse(client.get_run(run_id).info.artifact_uri).path)) / "adapter" / WEIGHTS
    shutil.copyfile(adapters[1] / WEIGHTS, stored)

    with pytest.raises(AdapterIntegrityError) as refused:
        handoff.fetch_training(cfg, tiny_project, "key-1")

    assert f"the adapter of MLflow run {run_id} (train key key-1): {WEIGHTS} differs" in str(refused.value)
    assert not (tiny_project / cfg.paths.adapter_dir).exists(), "nothing fetched into the project"


# --- in the flow: a refusal is final ------------------------------------------------------------


@pytest.mark.integration
def test_the_gate_task_refuses_a_changed_champion_once_without_retrying(project, tmp_path, prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks import pipeline

    cfg, _, client = project
    random_bytes(client, cfg.registry.model_name)
    promote_version(client, cfg.registry.model_name, "1", CHAMPION)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    metrics = EvalMetrics.from_totals(150.0, 100, 4)

    @flow(name="gate-only")
    def gate_only():
        return pipeline.gate_candidate(cfg, tmp_path, metrics, metrics)

    state = gate_only(return_state=True)

    assert state.is_failed()
    with pytest.raises(AdapterIntegrityError, match="version 1: adapter_model.safetensors differs"):
        state.result()
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert [(run.name.split("-")[0], run.run_count) for run in runs] == [("gate", 1)], "not retried"
