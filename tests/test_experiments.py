"""Every retrain run is a DVC experiment; dvc.yaml declares every module a stage runs; DVC's lock is waited for.

Real git (with a bare repository as the remote), real DVC with a local remote, real retrain flows on the
tiny model (Prefect, MLflow on SQLite, GX). The fast tests use a one-stage DVC project.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GIT, dvc_changes, make_project

from loraops.lineage import experiments, versioning
from loraops.project.params_file import load_config
from loraops.results import GateDecision, TrainResult, write_metrics

DVC = str(Path(sys.executable).parent / "dvc")
MODEL = "tiny-adapter"
STAGE_COMMANDS = {  # dvc.yaml stage -> `loraops stage` name
    "prepare_base_model": "prepare-base-model",
    "validate_dataset": "validate-dataset",
    "resolve_init_adapter": "resolve-init-adapter",
    "evaluate_baseline": "evaluate-baseline",
    "train_adapter": "train-adapter",
    "evaluate_adapter": "evaluate-adapter",
}


def _sh(cwd: Path, *command: str, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _with_git_remote(project: Path) -> Path:
    """A bare repository as the project's `origin`, with main pushed; returns the bare repository."""
    remote = project.parent / f"{project.name}.git"
    _sh(project.parent, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    _sh(project, "git", "remote", "add", "origin", str(remote))
    _sh(project, "git", "push", "-q", "origin", "main")
    return remote


def _experiments(project: Path) -> dict[str, dict]:
    """``dvc exp show --json`` rows by experiment name."""
    rows = json.loads(_sh(project, DVC, "exp", "show", "--json"))
    return {
        rev["name"]: rev for row in rows for experiment in row.get("experiments") or [] for rev in experiment["revs"]
    }


def _leaves(value, path=""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{path}.{key}" if path else key)
    else:
        yield path, value


# --- a one-stage project: fast ---------------------------------------------------------------------------

ONE_STAGE = """\
stages:
  train:
    cmd: python train.py
    deps: [data, train.py]
    params: [train.steps]
    outs: [out.txt]
    metrics: [metrics/train.json]
metrics:
  - metrics/gate.json
"""
TRAIN_PY = """\
import json, yaml
steps = yaml.safe_load(open("params.yaml"))["train"]["steps"]
open("out.txt", "w").write(str(steps))
json.dump({"steps": steps}, open("metrics/train.json", "w"))
"""


@pytest.fixture(scope="module")
def small_template(tmp_path_factory) -> Path:
    """Built once: a git + DVC project with one stage that has run, its DVC remote and a bare git remote.

    Both remotes are relative paths, so a copy of the folder is a self-contained project.
    """
    root = tmp_path_factory.mktemp("small-template")
    project = root / "small"
    (project / "data").mkdir(parents=True)
    (project / "metrics").mkdir()
    _sh(project, "git", "init", "-q", "-b", "main")
    _sh(project, DVC, "init", "-q")
    _sh(project, DVC, "remote", "add", "-d", "local", "../../dvc-remote")  # relative to .dvc/
    (project / "data" / "a.txt").write_text("hello\n")
    _sh(project, DVC, "add", "-q", "data")
    (project / "params.yaml").write_text("train:\n  steps: 3\n")
    (project / "dvc.yaml").write_text(ONE_STAGE)
    (project / "train.py").write_text(TRAIN_PY)
    _sh(project, "git", "add", "-A")
    _sh(project, *GIT, "commit", "-qm", "small project")
    _sh(root, "git", "init", "-q", "--bare", "-b", "main", "small.git")
    _sh(project, "git", "remote", "add", "origin", "../small.git")
    _sh(project, "git", "push", "-q", "origin", "main")
    _run_small(project, steps=3, passed=True)
    return root


@pytest.fixture
def small(small_template, tmp_path) -> Path:
    shutil.copytree(small_template, tmp_path, dirs_exist_ok=True)
    return tmp_path / "small"


def _run_small(project: Path, steps: int, passed: bool) -> None:
    """What a retrain run leaves behind: params.yaml, outputs, dvc.lock and the gate's metrics file."""
    (project / "params.yaml").write_text(f"train:\n  steps: {steps}\n")
    _sh(project, DVC, "repro", "-q")
    write_metrics({"passed": passed, "candidate_loss": 1.0 / steps}, project / "metrics" / "gate.json")


def test_experiment_names_are_valid_git_refs_and_distinct():
    from datetime import UTC, datetime

    when = datetime(2026, 12, 2, 14, 5, 9, tzinfo=UTC)
    assert experiments.experiment_name("Amber Moose", when) == "amber-moose-20261202-140509"
    names = {experiments.experiment_name(None, when) for _ in range(20)}
    assert len(names) == 20 and all(name.startswith("retrain-20261202-140509-") for name in names)
    for name in (*names, experiments.experiment_name("../we!rd//@{name}..lock", when)):
        subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cdef/{name}"], check=True)


def test_save_experiment_records_the_run_and_pushes_it_to_the_git_remote(small):
    name, rev = experiments.save_experiment(small, "run-a")

    assert experiments.find_experiment(small, "run-a") == rev
    assert versioning.git_show(small, rev, "dvc.lock") == (small / "dvc.lock").read_text()
    assert json.loads(versioning.git_show(small, rev, "metrics/gate.json"))["passed"] == 1
    assert _sh(small, "git", "status", "--porcelain", "--", "train.py") == ""  # the branch is untouched
    assert _sh(small, "git", "rev-parse", "HEAD") == _sh(small, "git", "rev-parse", "main")
    pushed = _sh(small, "git", "ls-remote", "origin", "refs/exps/*")
    assert f"{rev}\trefs/exps/" in pushed and pushed.rstrip().endswith("/run-a")

    _run_small(small, steps=5, passed=False)
    experiments.save_experiment(small, "run-b")
    shown = _experiments(small)
    assert shown["run-a"]["data"]["params"]["params.yaml"]["data"]["train"]["steps"] == 3
    assert shown["run-b"]["data"]["params"]["params.yaml"]["data"]["train"]["steps"] == 5
    assert shown["run-b"]["data"]["metrics"]["metrics/gate.json"]["data"]["passed"] == 0
    diff = json.loads(_sh(small, DVC, "metrics", "diff", "run-a", "run-b", "--json"))
    assert diff["metrics/train.json"]["steps"] == {"old": 3, "new": 5, "diff": 2}


def test_a_retried_save_reuses_its_experiment_and_a_clash_is_refused(small):
    first = experiments.save_experiment(small, "run-a", push=False)
    assert experiments.save_experiment(small, "run-a", push=False) == first  # a retry of the same run
    refs = _sh(small, "git", "for-each-ref", "refs/exps").count("/run-a")
    assert refs == 1

    _run_small(small, steps=7, passed=True)
    with pytest.raises(versioning.VersioningError, match="already exists .* records another dvc.lock"):
        experiments.save_experiment(small, "run-a", push=False)
    assert experiments.find_experiment(small, "run-a") == first[1]  # never overwritten


def test_save_experiment_outside_git_saves_nothing(tmp_path):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert experiments.save_experiment(tmp_path, "run-a") is None


def test_save_experiment_without_a_git_identity_commits_as_loraops(small, monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no global git identity
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        for key in ("NAME", "EMAIL"):
            monkeypatch.delenv(f"GIT_{role}_{key}", raising=False)

    _, rev = experiments.save_experiment(small, "run-a", push=False)

    assert _sh(small, "git", "log", "-1", "--format=%an <%ae>", rev).strip() == "loraops <loraops@localhost>"


# --- DVC's lock ----------------------------------------------------------------------------------------

HOLD_LOCK = """\
import sys, time, zc.lockfile
lock = zc.lockfile.LockFile(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.close()
"""


def _hold_dvc_lock(project: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the checkout's DVC lock (.dvc/tmp/lock), as a running `dvc repro` does."""
    (project / ".dvc" / "tmp").mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(project / ".dvc" / "tmp" / "lock"), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_dvc_command_fails_naming_the_process_that_keeps_the_lock(small):
    holder = _hold_dvc_lock(small, 120)
    try:
        with pytest.raises(versioning.DvcLockedError) as raised:
            versioning.record_pipeline_state(small, lock_wait_s=1)
    finally:
        holder.kill()
        holder.wait()
    message = str(raised.value)
    assert f"PID {holder.pid}" in message and "zc.lockfile" in message  # its command line
    assert "version.dvc_lock_wait_s" in message and "dvc commit --force" in message


def test_a_dvc_command_waits_for_a_lock_released_in_time(small):
    (small / "out.txt").write_text("changed while locked")
    holder = _hold_dvc_lock(small, 2)
    try:
        versioning.record_pipeline_state(small, lock_wait_s=60)
        assert holder.poll() is not None, "the command finished while the lock was still held"
    finally:
        holder.kill()
        holder.wait()
    lock = yaml.safe_load((small / "dvc.lock").read_text())
    out = next(out for out in lock["stages"]["train"]["outs"] if out["path"] == "out.txt")
    assert out["md5"] == hashlib.md5(b"changed while locked").hexdigest()


# --- metrics files: numbers only --------------------------------------------------------------------------


def test_metrics_files_hold_numbers_only_and_train_json_reads_back(tmp_path):
    trained = TrainResult(
        adapter_dir="/abs/adapters/candidate",
        trainable_params=10,
        total_params=100,
        steps=8,
        best_step=4,
        best_eval_loss=1.25,
        stopped_early=True,
        history_path="/abs/metrics/train_history.json",
    )
    path = write_metrics(trained.metrics(), tmp_path / "train.json")
    values = json.loads(path.read_text())
    assert values == {
        "best_eval_loss": 1.25,
        "best_step": 4,
        "steps": 8,
        "stopped_early": 1,
        "total_params": 100,
        "trainable_params": 10,
    }
    back = TrainResult.from_metrics(path, "adapters/candidate", "metrics/train_history.json")
    assert back == trained.model_copy(
        update={"adapter_dir": "adapters/candidate", "history_path": "metrics/train_history.json"}
    )

    decision = GateDecision(
        passed=False, reasons=["no gain"], baseline_loss=2.0, candidate_loss=2.1, champion_version="3"
    )
    gate = json.loads(write_metrics(decision.metrics(), tmp_path / "gate.json").read_text())
    assert gate == {"passed": 0, "baseline_loss": 2.0, "candidate_loss": 2.1, "champion_version": 3}
    with pytest.raises(TypeError, match="path are not numbers"):
        write_metrics({"path": "/abs"}, tmp_path / "bad.json")


# --- dvc.yaml declares every module a stage's command loads ------------------------------------------------

PROBE = """\
import atexit, json, os, runpy, sys
def dump():
    files = {m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "loraops" and getattr(m, "__file__", None)}
    open(os.environ["LORAOPS_MODULES_OUT"], "w").write(json.dumps(sorted(files)))
atexit.register(dump)
sys.argv = ["loraops", *sys.argv[1:]]
runpy.run_module("loraops", run_name="__main__", alter_sys=True)
"""


def _modules_loaded_by(project: Path, stage: str, out: Path) -> set[str]:
    """The loraops files the stage's command (`python -m loraops stage ...`) loads, relative to the project."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "stage", stage],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "LORAOPS_MODULES_OUT": str(out)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = {Path(file).resolve().relative_to(project.resolve()).as_posix() for file in json.loads(out.read_text())}
    return files | {"loraops/__main__.py"}  # `python -m loraops` runs it as __main__


@pytest.mark.slow
def test_every_stage_depends_on_each_module_it_runs_and_a_change_to_one_reruns_it(tmp_path, tiny_model_dir):
    from dvc.repo import Repo

    project = make_project(tmp_path / "project", tiny_model_dir)
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    loaded = {}
    for stage, command in STAGE_COMMANDS.items():  # in pipeline order: each stage's inputs exist
        loaded[stage] = _modules_loaded_by(project, command, tmp_path / f"{stage}.json")
        assert {"loraops/stages.py", "loraops/cli/app.py", "loraops/config.py"} <= loaded[stage]
        deps = [dep.rstrip("/") for dep in declared[stage]["deps"]]  # a file, or a whole sub-package folder
        undeclared = {m for m in loaded[stage] if not any(m == dep or m.startswith(f"{dep}/") for dep in deps)}
        assert not undeclared, f"{stage} runs modules dvc.yaml does not declare: {sorted(undeclared)}"
    versioning.record_pipeline_state(project)

    for module in sorted(set().union(*loaded.values())):
        path = project / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        try:
            with Repo(str(project)) as repo:
                changed = {key.rsplit(":", 1)[-1] for key in repo.status()}  # "path/dvc.yaml:stage"
        finally:
            path.write_bytes(original)
        expected = {stage for stage, modules in loaded.items() if module in modules}
        assert expected <= changed, f"editing {module}: dvc status reports {sorted(changed)}"
    with Repo(str(project)) as repo:
        assert not dvc_changes(repo.status())


# --- the retrain flow: two runs, two experiments ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, prefect_harness):
    """A tiny project with a git remote after two retrain flows: lora.r 16, then lora.r 8."""
    from flows.retrain import retrain

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = make_project(tmp_path_factory.mktemp("experiments") / "project", tiny_model_dir)
        _with_git_remote(root)
        results = [
            retrain(config=load_config(root / "params.yaml", {"lora.r": r}), project_dir=str(root)) for r in (16, 8)
        ]
        yield root, results


def _version_tags(project: Path, version: str) -> dict[str, str]:
    from loraops.registry.store import client_for

    return dict(
        client_for(load_config(project / "params.yaml").registry, project).get_model_version(MODEL, version).tags
    )


@pytest.mark.slow
@pytest.mark.integration
def test_each_run_is_an_experiment_with_its_params_and_numeric_metrics(two_runs):
    project, results = two_runs
    assert [result.registration.version for result in results] == ["1", "2"], [r.decision for r in results]
    names = [_version_tags(project, version)["loraops.dvc_experiment"] for version in ("1", "2")]
    shown = _experiments(project)

    assert set(names) <= set(shown) and names[0] != names[1]
    for name, r in zip(names, (16, 8)):
        data = shown[name]["data"]
        assert data["params"]["params.yaml"]["data"]["lora"]["r"] == r
        metrics = {file: values["data"] for file, values in data["metrics"].items()}
        assert {"metrics/train.json", "metrics/adapter.json", "metrics/baseline.json", "metrics/gate.json"} <= set(
            metrics
        )
        assert metrics["metrics/gate.json"]["passed"] == 1
        for key, value in _leaves(metrics):
            assert isinstance(value, int | float) and not isinstance(value, bool), f"{key} = {value!r} is not a number"
    assert (
        shown[names[1]]["data"]["metrics"]["metrics/train.json"]["data"]["trainable_params"] * 2
        == (shown[names[0]]["data"]["metrics"]["metrics/train.json"]["data"]["trainable_params"])
    )

    diff = json.loads(_sh(project, DVC, "metrics", "diff", names[0], names[1], "--json"))
    assert "trainable_params" in diff["metrics/train.json"] and "loss" in diff["metrics/adapter.json"]
    plots = json.loads(_sh(project, DVC, "plots", "diff", names[0], names[1], "--json"))
    assert set(plots["data"]["loss"][0]["revisions"]) == set(names)
    pushed = _sh(project, "git", "ls-remote", "origin", "refs/exps/*")
    assert all(f"/{name}\n" in pushed for name in names)


@pytest.mark.slow
@pytest.mark.integration
def test_the_version_and_its_run_name_the_experiment_and_the_card_says_how_to_reproduce(two_runs):
    import mlflow.artifacts

    from loraops.registry.store import client_for

    project, results = two_runs
    tags = _version_tags(project, "1")
    name, rev = tags["loraops.dvc_experiment"], tags["loraops.dvc_experiment_rev"]
    assert experiments.find_experiment(project, name) == rev
    assert (
        hashlib.md5(versioning.git_show(project, rev, "dvc.lock").encode()).hexdigest() == tags["loraops.dvc_lock_md5"]
    )
    client = client_for(load_config(project / "params.yaml").registry, project)
    run = client.get_run(results[0].registration.run_id)
    assert (run.data.tags["loraops.dvc_experiment"], run.data.tags["loraops.dvc_experiment_rev"]) == (name, rev)
    card = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="model_card.md", tracking_uri=client.tracking_uri
        )
    ).read_text()
    assert f"dvc exp apply {name} && dvc pull && dvc repro" in card


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_exp_apply_pull_and_repro_rebuild_the_first_runs_adapter_bit_identically(two_runs):
    project, _ = two_runs
    name, rev = (_version_tags(project, "1")[key] for key in ("loraops.dvc_experiment", "loraops.dvc_experiment_rev"))
    recorded = yaml.safe_load(versioning.git_show(project, rev, "dvc.lock"))["stages"]
    _sh(project, DVC, "exp", "apply", name)  # the workspace held the second run
    assert yaml.safe_load((project / "params.yaml").read_text())["lora"]["r"] == 16
    shutil.rmtree(project / ".dvc" / "cache")  # the outputs come from the DVC remote
    shutil.rmtree(project / "adapters")
    _sh(project, DVC, "pull")
    repro = _sh(project, DVC, "repro")
    assert "Running stage 'resolve_init_adapter'" in repro and "Stage 'train_adapter' didn't change" in repro
    assert json.loads(_sh(project, DVC, "metrics", "diff", name, "--json")) == {}

    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the flow trained under this suite (single_threaded_torch)
    _sh(project, DVC, "repro", "--force", "--single-item", "train_adapter", env=one_thread)  # train again, from scratch
    rebuilt = yaml.safe_load((project / "dvc.lock").read_text())["stages"]

    def adapter(stages):
        return next(o["md5"] for o in stages["train_adapter"]["outs"] if o["path"] == "adapters/candidate")

    assert adapter(rebuilt) == adapter(recorded)
    assert json.loads(_sh(project, DVC, "metrics", "diff", name, "--json")) == {}
