"""`loraops reproduce`: a registered version rebuilt from its lineage on the tiny model, and every way it can refuse.

One retrain flow per module (real Prefect, MLflow on SQLite, DVC with a local remote, GX) registers
``tiny-adapter/1``; bad-input cases register extra versions of the same run with altered tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import GIT, make_project
from typer.testing import CliRunner

from loraops.cli.app import app
from loraops.project.params_file import load_config
from loraops.registry.mlflow_model import tracking_uri_set
from loraops.reproduce.compare import compare_adapters, inputs_check
from loraops.reproduce.recorded import ReproduceError, parse_version_ref
from loraops.reproduce.report import Check, ReproductionReport, TensorDiff, format_report

DVC = str(Path(sys.executable).parent / "dvc")
MODEL = "tiny-adapter"


def _sh(cwd: Path, *command: str, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _reproduce(project: Path, *args: str):
    return CliRunner().invoke(app, ["reproduce", *args, "--params", str(project / "params.yaml")])


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, prefect_harness) -> Path:
    """A tiny project after one retrain flow: tiny-adapter/1 registered, dvc.lock and params.yaml not committed."""
    from flows.retrain import retrain

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = make_project(tmp_path_factory.mktemp("reproduce") / "project", tiny_model_dir)
        cfg = load_config(root / "params.yaml", {"registry.auto_promote": True})
        assert retrain(config=cfg, project_dir=str(root)).registration.version == "1"
        yield root


def _checkout_state(project: Path) -> dict:
    tracked = (
        "dvc.lock",
        "params.yaml",
        "data.dvc",
        "adapters/candidate/adapter_model.safetensors",
        "metrics/adapter.json",
    )
    return {
        "status": _sh(project, "git", "status", "--porcelain"),
        "worktrees": _sh(project, "git", "worktree", "list"),
        **{path: hashlib.md5((project / path).read_bytes()).hexdigest() for path in tracked},
    }


@pytest.fixture
def untouched(project):
    """Whatever reproduce does, the user's checkout and its git worktrees are exactly as before."""
    before = _checkout_state(project)
    yield project
    assert _checkout_state(project) == before


# A version registered before runs were saved as DVC experiments: lineage tags and MLflow artifacts only.
BEFORE_EXPERIMENTS = {"loraops__dvc_experiment": None, "loraops__dvc_experiment_rev": None}


def _version_with(project: Path, **tags: str | None) -> str:
    """Register version 1's run again with some lineage tags changed (None: removed); returns the version."""
    client = _client(project)
    original = client.get_model_version(MODEL, "1")
    changed = {key.replace("__", "."): value for key, value in tags.items()}
    merged = {key: value for key, value in {**original.tags, **changed}.items() if value is not None}
    with tracking_uri_set(client):  # MLflow's SQL registry resolves a models:/m-… source through the global URI
        version = client.create_model_version(MODEL, source=original.source, run_id=original.run_id, tags=merged)
    return str(version.version)


# --- the key every registered version carries ----------------------------------------------------


def test_registered_version_stores_the_exact_lock_and_params_of_its_run(project):
    import mlflow.artifacts

    client = _client(project)
    version = client.get_model_version(MODEL, "1")
    lock = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="lineage/dvc.lock", tracking_uri=client.tracking_uri
    )
    params = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="lineage/params.yaml", tracking_uri=client.tracking_uri
    )
    assert hashlib.md5(Path(lock).read_bytes()).hexdigest() == version.tags["loraops.dvc_lock_md5"]
    assert Path(lock).read_bytes() == (project / "dvc.lock").read_bytes()
    assert Path(params).read_bytes() == (project / "params.yaml").read_bytes()
    assert version.tags["loraops.git_commit"] == _sh(project, "git", "rev-parse", "HEAD").strip()
    assert version.tags["loraops.git_dirty"] == "False"  # params.yaml and dvc.lock changed, but are recorded by hash
    assert version.tags["loraops.params_hash"] == load_config(project / "params.yaml").params_hash()
    # every output except the rebuilt-not-pushed base model is in the remote: metrics and plots included
    lock_outs = [
        out["path"]
        for stage in yaml.safe_load(Path(lock).read_text())["stages"].values()
        for out in stage.get("outs", [])
    ]
    assert {
        "adapters/candidate",
        "metrics/adapter.json",
        "metrics/baseline.json",
        "metrics/plots/eval_loss.json",
    } <= set(lock_outs)
    assert "in sync" in _sh(project, DVC, "status", "--cloud").lower()


def test_dvc_repro_with_nothing_changed_is_a_noop(untouched):
    started = time.monotonic()
    output = _sh(untouched, DVC, "repro")
    seconds = time.monotonic() - started

    # Only the registry lookup reruns (always_changed); its output is unchanged, so nothing else does.
    assert re.findall(r"Running stage '(\w+)'", output) == ["resolve_init_adapter"], output
    assert "Stage 'train_adapter' didn't change, skipping" in output
    print(f"no-op dvc repro took {seconds:.1f} s")  # timing is measured in benchmarks, not asserted here


# --- reproduce: the rebuild --------------------------------------------------------------------------


@pytest.mark.slow
def test_reproduce_rebuilds_version_1_and_prints_a_matching_table(untouched, tmp_path):
    report_file = tmp_path / "report.json"
    result = _reproduce(untouched, f"{MODEL}/1", "--report", str(report_file), "--weight-tolerance", "1e-6")

    assert result.exit_code == 0, result.output
    assert "reproduced: the rebuild matches the registered version within tolerance" in result.output
    for row in ("adapter validation loss", "baseline validation loss", "adapter tensors", "inputs in dvc.lock"):
        assert row in result.output
    report = ReproductionReport.model_validate_json(report_file.read_text())
    tags = _client(untouched).get_model_version(MODEL, "1").tags
    assert report.matched and report.git_commit == tags["loraops.dvc_experiment_rev"]  # the run's experiment
    assert (
        report.dvc_experiment == tags["loraops.dvc_experiment"]
        and f"(DVC experiment {report.dvc_experiment})" in result.output
    )
    assert report.tensors and all(t.max_abs_diff is not None and t.max_abs_diff <= 1e-6 for t in report.tensors)
    assert next(c for c in report.checks if c.name.startswith("inputs")).difference == "identical"


@pytest.mark.slow
def test_reproduce_flow_fails_with_the_differences_when_the_registered_loss_was_altered(untouched):
    from flows.reproduce import reproduce
    from loraops.reproduce.report import ReproductionMismatch

    registered = float(_client(untouched).get_model_version(MODEL, "1").tags["loraops.val_loss"])
    version = _version_with(untouched, loraops__val_loss=repr(registered + 0.01), **BEFORE_EXPERIMENTS)

    with pytest.raises(ReproductionMismatch) as raised:
        reproduce(f"{MODEL}/{version}", project_dir=str(untouched))

    differences = raised.value.report.differences()
    assert [check.name for check in differences] == ["adapter validation loss"]
    assert "1.00e-02" in differences[0].difference
    assert "adapter validation loss: registered" in str(raised.value)


# --- reproduce: refusals (exit 2, nothing rebuilt, nothing touched) ---------------------------------


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (f"{MODEL}/99", "has no version '99'"),
        ("no-such-model/1", "has no version '1'"),
        (f"{MODEL}@nobody", "has no alias 'nobody'"),
        (MODEL, "use NAME/VERSION"),
    ],
)
def test_reproduce_refuses_an_unknown_version(untouched, ref, message):
    result = _reproduce(untouched, ref)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_reproduce_flow_fails_on_a_version_it_cannot_rebuild(untouched):
    from flows.reproduce import reproduce

    with pytest.raises(ReproduceError, match="has no version '99'"):
        reproduce(f"{MODEL}/99", project_dir=str(untouched))


def test_reproduce_refuses_a_version_without_lineage_tags(untouched):
    client = _client(untouched)
    original = client.get_model_version(MODEL, "1")
    with tracking_uri_set(client):
        bare = client.create_model_version(MODEL, source=original.source, run_id=original.run_id)

    result = _reproduce(untouched, f"{MODEL}/{bare.version}")
    assert result.exit_code == 2
    assert "has no lineage tags" in result.output and "loraops.git_commit" in result.output


def test_reproduce_refuses_uncommitted_code_unless_allowed(untouched):
    version = _version_with(untouched, loraops__git_dirty="True", **BEFORE_EXPERIMENTS)

    result = _reproduce(untouched, f"{MODEL}/{version}")
    assert result.exit_code == 2
    assert "uncommitted code" in result.output and "--allow-dirty" in result.output


def test_allow_dirty_lets_a_dirty_version_past_the_checks(untouched):
    from loraops.registry.store import client_for
    from loraops.reproduce.recorded import check_reproducible, fetch_recorded_version

    version = _version_with(untouched, loraops__git_dirty="True", **BEFORE_EXPERIMENTS)
    client = client_for(load_config(untouched / "params.yaml").registry, untouched)
    recorded = fetch_recorded_version(client, MODEL, version)

    check_reproducible(recorded, untouched, allow_dirty=True)
    with pytest.raises(ReproduceError, match="uncommitted code"):
        check_reproducible(recorded, untouched, allow_dirty=False)


def test_reproduce_refuses_a_commit_missing_from_the_repository(untouched):
    version = _version_with(
        untouched, loraops__git_commit="0123456789abcdef0123456789abcdef01234567", **BEFORE_EXPERIMENTS
    )

    result = _reproduce(untouched, f"{MODEL}/{version}")
    assert result.exit_code == 2
    assert "is not in the git repository" in result.output and "git fetch" in result.output


def test_a_version_names_its_experiment_whose_commit_holds_its_lock_and_params(untouched):
    from loraops.lineage.versioning import git_show

    tags = _client(untouched).get_model_version(MODEL, "1").tags
    name, rev = tags["loraops.dvc_experiment"], tags["loraops.dvc_experiment_rev"]
    assert _sh(untouched, "git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}").strip() == rev
    assert git_show(untouched, rev, "dvc.lock") == (untouched / "dvc.lock").read_text()
    assert git_show(untouched, rev, "params.yaml") == (untouched / "params.yaml").read_text()


def test_reproduce_refuses_an_experiment_missing_from_the_repository(untouched):
    version = _version_with(untouched, loraops__dvc_experiment_rev="0123456789abcdef0123456789abcdef01234567")

    result = _reproduce(untouched, f"{MODEL}/{version}")
    assert result.exit_code == 2
    assert "is not in the git repository" in result.output and "dvc exp pull origin" in result.output


def test_reproduce_refuses_a_lock_that_does_not_match_its_recorded_hash(untouched):
    version = _version_with(untouched, loraops__dvc_lock_md5="0" * 32)

    result = _reproduce(untouched, f"{MODEL}/{version}")
    assert result.exit_code == 2
    assert "the lineage was altered" in result.output


def test_reproduce_refuses_lineage_that_points_at_different_data(untouched):
    version = _version_with(untouched, loraops__data_md5="f" * 32 + ".dir")

    result = _reproduce(untouched, f"{MODEL}/{version}")
    assert result.exit_code == 2
    assert "points at different data" in result.output and "f" * 32 in result.output


def test_reproduce_refuses_when_the_remote_lacks_a_recorded_object(untouched, tmp_path):
    data_md5 = _client(untouched).get_model_version(MODEL, "1").tags["loraops.data_md5"]
    remote = untouched.parent / f"{untouched.name}-remote"
    manifest = remote / "files" / "md5" / data_md5[:2] / data_md5[2:]
    shutil.move(manifest, tmp_path / "manifest")
    try:
        result = _reproduce(untouched, f"{MODEL}/1")
    finally:
        shutil.move(tmp_path / "manifest", manifest)
    assert result.exit_code == 2
    assert "the DVC remote 'local' does not hold everything this version recorded" in result.output


def test_reproduce_refuses_a_registered_adapter_whose_weights_changed(untouched, tmp_path):
    from urllib.parse import unquote, urlparse

    from loraops.registry.mlflow_model import adapter_folder

    client = _client(untouched)
    source = client.get_model_version(MODEL, "1").source  # models:/m-…: the adapter is inside the MLflow model
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    weights = adapter_folder(Path(unquote(urlparse(location).path))) / "adapter_model.safetensors"
    shutil.copy(weights, tmp_path / "original")
    weights.write_bytes(os.urandom(weights.stat().st_size))
    try:
        result = _reproduce(untouched, f"{MODEL}/1")
    finally:
        shutil.copy(tmp_path / "original", weights)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{MODEL} version 1: adapter_model.safetensors differs from the sha256 recorded at registration" in message
    assert "Traceback" not in result.output


# --- experiments -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_exp_run_with_a_lora_override_is_listed_and_diffed_with_its_metrics(project, tmp_path):
    """`dvc exp run -S lora.r=8` against the committed run: exp show, metrics diff and plots diff see both."""
    workspace = tmp_path / "project"
    shutil.copytree(project, workspace, symlinks=True)
    _sh(workspace, "git", "add", "-A")
    _sh(workspace, *GIT, "commit", "-qm", "the retrain run")
    identity = {"GIT_AUTHOR_NAME": "loraops-tests", "GIT_AUTHOR_EMAIL": "tests@loraops.invalid"}
    env = {
        **os.environ,
        **identity,
        "GIT_COMMITTER_NAME": "loraops-tests",
        "GIT_COMMITTER_EMAIL": "tests@loraops.invalid",
    }

    _sh(workspace, DVC, "exp", "run", "-S", "lora.r=8", "--name", "rank-8", env=env)

    rows = json.loads(_sh(workspace, DVC, "exp", "show", "--json"))
    head = next(row for row in rows if row["rev"] != "workspace")
    experiment = head["experiments"][0]["revs"][0]
    assert experiment["name"] == "rank-8"
    assert experiment["data"]["params"]["params.yaml"]["data"]["lora"]["r"] == 8
    assert head["data"]["params"]["params.yaml"]["data"]["lora"]["r"] == 16
    assert "loss" in experiment["data"]["metrics"]["metrics/adapter.json"]["data"]

    diff = json.loads(_sh(workspace, DVC, "metrics", "diff", "HEAD", "--json"))
    assert (
        diff["metrics/train.json"]["trainable_params"]["new"]
        == diff["metrics/train.json"]["trainable_params"]["old"] // 2
    )
    assert "loss" in diff["metrics/adapter.json"]
    plots = json.loads(_sh(workspace, DVC, "plots", "diff", "HEAD", "--json"))
    assert set(plots["data"]["loss"][0]["revisions"]) == {"HEAD", "workspace"}


# --- the pure parts ----------------------------------------------------------------------------------


def test_parse_version_ref_accepts_versions_aliases_and_model_uris():
    assert parse_version_ref("tiny-adapter/3") == ("tiny-adapter", "3")
    assert parse_version_ref("models:/team/model/3") == ("team/model", "3")
    assert parse_version_ref("tiny-adapter@champion") == ("tiny-adapter", "champion")
    with pytest.raises(ReproduceError, match="NAME/VERSION"):
        parse_version_ref("tiny-adapter")


def test_compare_adapters_reports_the_max_difference_per_tensor_and_what_is_missing(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = {"a.lora_A.weight": torch.ones(4, 2), "a.lora_B.weight": torch.zeros(2, 4)}
    (tmp_path / "rebuilt").mkdir()
    (tmp_path / "registered").mkdir()
    save_file(weights, tmp_path / "registered" / "adapter_model.safetensors")
    changed = {"a.lora_A.weight": torch.ones(4, 2) + 0.25, "extra.weight": torch.ones(1)}
    save_file(changed, tmp_path / "rebuilt" / "adapter_model.safetensors")

    diffs = {d.name: d for d in compare_adapters(tmp_path / "rebuilt", tmp_path / "registered")}

    assert diffs["a.lora_A.weight"].max_abs_diff == pytest.approx(0.25)
    assert diffs["a.lora_B.weight"].problem == "missing in rebuilt adapter"
    assert diffs["extra.weight"].problem == "missing in registered adapter"
    assert compare_adapters(tmp_path / "nothing", tmp_path / "none")[0].problem.startswith("no adapter weights")


def test_inputs_check_compares_data_code_and_params_but_not_outputs_of_other_stages():
    def lock(data_md5: str, summary_md5: str, r: int) -> dict:
        return {
            "stages": {
                "validate": {
                    "deps": [{"path": "data", "md5": data_md5}],
                    "outs": [{"path": "summary.json", "md5": summary_md5}],
                },
                "train": {
                    "deps": [{"path": "data", "md5": data_md5}, {"path": "summary.json", "md5": summary_md5}],
                    "params": {"params.yaml": {"lora": {"r": r}}},
                },
            }
        }

    assert inputs_check(lock("d1", "s1", 16), lock("d1", "s2", 16)).passed  # an output may embed a path
    changed = inputs_check(lock("d1", "s1", 16), lock("d2", "s1", 8))
    assert not changed.passed and changed.difference == "differ: data, params.yaml:lora"


def test_format_report_prints_one_row_per_check_and_the_verdict():
    report = ReproductionReport(
        model_name="m",
        version="2",
        git_commit="a" * 40,
        dvc_lock_md5="b" * 32,
        data_md5="c" * 32 + ".dir",
        checks=[
            Check(
                name="adapter validation loss",
                registered="1.000000",
                rebuilt="1.500000",
                difference="5.00e-01",
                passed=False,
            ),
            Check(name="outputs byte-identical", registered="3", rebuilt="2", difference="differ: " + "x" * 60),
        ],
        tensors=[TensorDiff(file="adapter_model.safetensors", name="w", shape=[2], max_abs_diff=0.5)],
    )

    text = format_report(report)

    assert "m version 2: rebuilt from commit aaaaaaaaaaaa" in text
    assert re.search(r"adapter validation loss +1\.000000 +1\.500000 +5\.00e-01 +DIFFERS", text)
    assert "outputs byte-identical: differ: xxx" in text  # long differences go under the table
    assert "5.000e-01  adapter_model.safetensors:w (2,)" in text
    assert text.endswith("NOT reproduced: 1 check(s) differ")


def test_data_dvc_is_pointed_at_the_recorded_data_version(tmp_path):
    from loraops.reproduce.worktree import _point_data_at

    dvc_file = tmp_path / "data.dvc"
    dvc_file.write_text(
        yaml.safe_dump({"outs": [{"md5": "old.dir", "size": 10, "nfiles": 2, "hash": "md5", "path": "data"}]})
    )

    assert _point_data_at(dvc_file, "new.dir") == "data"
    assert yaml.safe_load(dvc_file.read_text())["outs"] == [{"md5": "new.dir", "hash": "md5", "path": "data"}]


def test_a_relative_local_remote_is_re_anchored_at_the_users_checkout(tmp_path):
    """The project's default remote is `../.dvcstore` (relative to .dvc/): in a worktree it must still mean the user's."""
    from loraops.lineage.versioning import remote_urls
    from loraops.reproduce.worktree import _use_users_remotes

    user, worktree = tmp_path / "checkout", tmp_path / "worktree"
    for folder in (user, worktree):
        folder.mkdir()
        _sh(folder, DVC, "init", "--no-scm", "-q")
        _sh(folder, DVC, "remote", "add", "-d", "local", ".dvcstore")  # stored as ../.dvcstore, as in this repo
        _sh(folder, DVC, "remote", "add", "s3", "s3://bucket/path")
    (user / ".dvc" / "config.local").write_text("['remote \"s3\"']\n    access_key_id = someone\n")

    _use_users_remotes(worktree, user)

    assert remote_urls(worktree) == {"local": str(user / ".dvcstore"), "s3": "s3://bucket/path"}
    assert "access_key_id = someone" in (worktree / ".dvc" / "config.local").read_text()
    assert "../.dvcstore" in (worktree / ".dvc" / "config").read_text()  # the committed config is left as it was
