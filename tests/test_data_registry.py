"""Data from a DVC data registry (a real git + DVC repo with a local remote in a temp dir): import,
refresh, revisions, and retrain ending early when nothing changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GIT, TINY_DATA

from loraops.inputs.data_registry import DataRegistryError, refresh_data
from loraops.lineage.versioning import read_data_version
from loraops.project.params_file import load_config

DVC = str(Path(sys.executable).parent / "dvc")
DATASET = "datasets/chat"


def _run(cwd: Path, *args: str) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_registry(directory: Path) -> Path:
    """A data registry: git + DVC repo holding the tiny dataset under datasets/chat, pushed to its remote."""
    directory.mkdir(parents=True)
    shutil.copytree(TINY_DATA, directory / DATASET)
    _run(directory, "git", "init", "-q", "-b", "main")
    _run(directory, DVC, "init", "-q")
    _run(directory, DVC, "remote", "add", "-d", "store", str(directory.parent / f"{directory.name}-store"))
    _run(directory, DVC, "add", "-q", DATASET)
    _run(directory, "git", "add", "-A")
    _run(directory, *GIT, "commit", "-q", "-m", "chat dataset")
    _run(directory, DVC, "push", "-q")
    return directory


def add_rows(registry: Path, *questions: str) -> str:
    """Append training rows in the registry, commit and push them; returns the new commit."""
    with (registry / DATASET / "train.jsonl").open("a") as handle:
        for question in questions:
            row = {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"Answer: {question}"},
                ]
            }
            handle.write(json.dumps(row) + "\n")
    _run(registry, DVC, "add", "-q", DATASET)
    _run(registry, "git", "add", "-A")
    _run(registry, *GIT, "commit", "-q", "-m", f"{len(questions)} rows")
    _run(registry, DVC, "push", "-q")
    return _run(registry, "git", "rev-parse", "HEAD")


def import_from(project: Path, registry: Path) -> None:
    """Replace the project's `dvc add` data by `dvc import REGISTRY datasets/chat -o data`, committed."""
    _run(project, "git", "rm", "-q", "data.dvc")
    shutil.rmtree(project / "data")
    _run(project, DVC, "import", "-q", str(registry), DATASET, "-o", "data")
    _run(project, "git", "add", "-A")
    _run(project, *GIT, "commit", "-q", "-m", "data from the registry")


@pytest.fixture
def registry(tmp_path) -> Path:
    return make_registry(tmp_path / "registry")


@pytest.fixture
def imported_project(tiny_project, registry) -> Path:
    import_from(tiny_project, registry)
    return tiny_project


def test_an_import_is_refreshed_to_the_registrys_latest_rows_or_a_given_revision(imported_project, registry):
    first_rev = _run(registry, "git", "rev-parse", "HEAD")
    imported = read_data_version(imported_project)
    assert (imported.kind, imported.rev) == ("registry", first_rev)
    assert imported.source == f"{registry}:{DATASET}"

    unchanged = refresh_data(imported_project)
    assert not unchanged.updated and unchanged.md5 == imported.md5

    new_rev = add_rows(registry, "What is the tallest mountain?")
    fresh = refresh_data(imported_project)
    assert fresh.updated and fresh.rev == new_rev and fresh.md5 != imported.md5
    assert "tallest mountain" in (imported_project / "data" / "train.jsonl").read_text()

    pinned = refresh_data(imported_project, rev=first_rev)  # back to the first revision
    assert pinned.updated and (pinned.rev, pinned.md5) == (first_rev, imported.md5)
    assert "tallest mountain" not in (imported_project / "data" / "train.jsonl").read_text()


def test_a_revision_for_data_that_is_no_import_is_refused_with_what_to_do(tiny_project):
    with pytest.raises(DataRegistryError, match=r"data_rev.*made by `dvc add data`.*leave data_rev empty"):
        refresh_data(tiny_project, rev="v2")
    assert read_data_version(tiny_project).kind == "local"


def test_a_revision_the_registry_lacks_is_named(imported_project):
    with pytest.raises(DataRegistryError, match=r"could not refresh .*data\.dvc from .*datasets/chat.*data_rev"):
        refresh_data(imported_project, rev="no-such-branch")


def test_the_data_diff_counts_rows_added_removed_and_changed_since_the_earlier_version(imported_project, registry):
    from loraops.inputs.data_diff import diff_against

    old_md5 = read_data_version(imported_project).md5
    train = registry / DATASET / "train.jsonl"
    lines = train.read_text().splitlines()
    changed = json.loads(lines[0])
    changed["messages"][1]["content"] = "Six, of course."  # same question, new answer
    train.write_text("\n".join([json.dumps(changed), *lines[2:]]) + "\n")  # and line 2 removed
    add_rows(registry, "Count 7", "Count 8")
    refresh_data(imported_project)

    diff = diff_against(load_config(imported_project / "params.yaml"), imported_project, old_md5, "champion v1")
    train_diff, validation_diff = diff.splits
    assert (train_diff.added, train_diff.removed, train_diff.changed) == (2, 1, 1)
    assert train_diff.examples == {
        "added": ["count 7", "count 8"],
        "removed": ["what is two plus five?"],
        "changed": ["what is three plus three?"],
    }
    assert (validation_diff.added, validation_diff.removed, validation_diff.changed) == (0, 0, 0)
    assert "| train | 2 | 1 | 1 |" in diff.markdown()

    unknown = diff_against(load_config(imported_project / "params.yaml"), imported_project, "0" * 32 + ".dir", "v9")
    assert not unknown.splits and "not in the local DVC cache" in unknown.note


def _task_names(state) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0] for run in runs}


def _client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow  # three tiny trainings (~2 min on the shared 2 cores)
def test_retrain_skips_unchanged_inputs_trains_when_forced_or_given_new_rows(
    imported_project, registry, prefect_harness
):
    from flows.retrain import retrain

    project = imported_project
    cfg = load_config(project / "params.yaml", {"registry.auto_promote": True})
    first = retrain(config=cfg, project_dir=str(project), return_state=True)
    assert first.result().registration.version == "1"
    client = _client(project)
    champion = client.get_model_version_by_alias("tiny-adapter", "champion")
    first_rev = read_data_version(project).rev
    assert champion.tags["loraops.data_source"] == f"{registry}:{DATASET}@{first_rev}"

    # Nothing new: ends early, Completed, no model loaded (no base-model, baseline or training task ran).
    skipped = retrain(config=cfg, project_dir=str(project), return_state=True)
    assert skipped.is_completed() and skipped.message.startswith("nothing changed since version 1")
    assert skipped.result().unchanged and skipped.result().version == "1"
    assert _task_names(skipped) == {"check-servers", "refresh-data", "check-freshness"}
    experiment_id = client.get_run(champion.run_id).info.experiment_id
    assert len(client.search_runs([experiment_id])) == 1  # no MLflow run either

    # --force trains on the same inputs (and the gate refuses the same adapter again).
    forced = retrain(config=cfg, project_dir=str(project), return_state=True, force=True)
    assert forced.name == "Refused" and "prepare-base-model" in _task_names(forced)

    # New rows in the registry: the next run refreshes data.dvc and trains on the new md5.
    new_rev = add_rows(registry, *(f"Count {n}" for n in range(2, 6)))
    fresh = retrain(config=cfg, project_dir=str(project), return_state=True)
    data = read_data_version(project)
    assert data.rev == new_rev and data.md5 != champion.tags["loraops.data_md5"]
    assert "train-adapter" in _task_names(fresh)
    run = client.get_run(fresh.result().registration.run_id)
    assert run.data.tags["loraops.data_md5"] == data.md5
    assert run.data.tags["loraops.data_source"] == f"{registry}:{DATASET}@{new_rev}"
    assert yaml.safe_load((project / "data.dvc").read_text())["deps"][0]["repo"]["rev_lock"] == new_rev
    # The diff against the champion's data is on the MLflow run (and a Prefect artifact): four rows added.
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "reports/data_diff.json")).read_text())
    assert logged["against"] == "champion v1" and logged["splits"][0]["added"] == 4


def test_freshness_matches_all_four_inputs_of_the_last_finished_run_and_never_uncommitted_ones(tiny_project):
    from loraops.inputs.freshness import check_freshness, current_inputs
    from loraops.registry.store import client_for

    cfg = load_config(tiny_project / "params.yaml")
    client = client_for(cfg.registry, tiny_project)
    assert not check_freshness(cfg, tiny_project, client).unchanged  # no earlier run at all
    inputs = current_inputs(cfg, tiny_project)
    assert inputs is not None and inputs["loraops.params_hash"] == cfg.params_hash()
    experiment = client.create_experiment(cfg.registry.experiment)
    run = client.create_run(experiment, tags={**inputs, "loraops.git_dirty": "False"})
    assert not check_freshness(cfg, tiny_project, client).unchanged  # still RUNNING: not a finished run
    client.set_terminated(run.info.run_id, "FINISHED")

    same = check_freshness(cfg, tiny_project, client)
    assert same.unchanged and same.run_id == run.info.run_id and same.version is None
    assert same.message.startswith(f"nothing changed since MLflow run {run.info.run_id}")
    assert not check_freshness(cfg, tiny_project, client, force=True).unchanged
    other = load_config(tiny_project / "params.yaml", {"lora.r": 8})
    assert not check_freshness(other, tiny_project, client).unchanged  # other params

    train = tiny_project / "data" / "train.jsonl"
    original = train.read_bytes()
    train.write_bytes(original + original.splitlines(keepends=True)[0])  # edited, not `dvc add`ed
    assert current_inputs(cfg, tiny_project) is None and not check_freshness(cfg, tiny_project, client).unchanged
    train.write_bytes(original)
    (tiny_project / "loraops" / "evaluate" / "gate.py").write_text("# an uncommitted edit\n", encoding="utf-8")
    assert current_inputs(cfg, tiny_project) is None and not check_freshness(cfg, tiny_project, client).unchanged
