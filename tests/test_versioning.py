"""DVC + git lineage against a real git repository, a real DVC project and a local-directory remote."""

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

from loraops.config import LoraopsConfig
from loraops.data.files import file_md5
from loraops.lineage.versioning import (
    VersioningError,
    collect_lineage,
    data_md5,
    ensure_default_remote,
    git_state,
    push_outputs,
    record_pipeline_state,
)

# The stage would write the params value; tests write the output themselves (as the flow does
# in-process) with different content, so the output proves nothing was re-run.
DVC_YAML = """\
stages:
  train:
    cmd: python -c "import yaml; p = yaml.safe_load(open('params.yaml')); open('out/result.txt', 'w').write(str(p['train']['steps']))"
    deps: [data]
    params: [train.steps]
    outs: [out]
"""


def sh(cwd: Path, *command: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def git_commit(cwd: Path, message: str) -> None:
    sh(cwd, "git", "add", "-A")
    sh(cwd, "git", "-c", "user.name=loraops-test", "-c", "user.email=test@loraops.invalid", "commit", "-qm", message)


def dvc_status(repo: Path) -> dict:
    return json.loads(dvc(repo, "status", "--json"))


@pytest.fixture(scope="session")
def project_template(tmp_path_factory) -> Path:
    """Built once: a committed git+DVC project (data/ added with DVC, one stage) and its remote.

    The remote path is relative, so a copy of the whole folder is a self-contained project.
    """
    root = tmp_path_factory.mktemp("template")
    repo = root / "project"
    (repo / "data").mkdir(parents=True)
    sh(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "--default", "local", "../remote")
    (repo / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    dvc(repo, "add", "-q", "data")
    (repo / "params.yaml").write_text("train:\n  steps: 3\nother: 1\n")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "train.py").write_text("print('code under version control')\n")
    # Like the project's own .gitignore, stage outputs are ignored up front (DVC would append them).
    (repo / ".gitignore").write_text("/data\n/out\n")
    git_commit(repo, "project")
    return root


@pytest.fixture
def project(project_template, tmp_path) -> Path:
    shutil.copytree(project_template, tmp_path, dirs_exist_ok=True)
    return tmp_path / "project"


def write_output(repo: Path, text: str = "written in-process") -> Path:
    (repo / "out").mkdir(exist_ok=True)
    path = repo / "out" / "result.txt"
    path.write_text(text)
    return path


def lock_stage(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]


def test_record_pipeline_state_records_what_ran_without_rerunning(project):
    write_output(project)
    assert dvc_status(project), "before recording, dvc sees a stage that never ran"

    record_pipeline_state(project)

    assert dvc_status(project) == {}
    stage = lock_stage(project)
    assert stage["params"]["params.yaml"] == {"train.steps": 3}
    assert stage["deps"][0]["md5"] == data_md5(project)
    assert (project / "out" / "result.txt").read_text() == "written in-process"
    out_md5 = stage["outs"][0]["md5"]
    assert out_md5.endswith(".dir")
    assert (project / ".dvc" / "cache" / "files" / "md5" / out_md5[:2] / out_md5[2:]).exists()


def test_record_pipeline_state_records_edited_data_and_params(project):
    write_output(project)
    record_pipeline_state(project)
    before = data_md5(project)
    (project / "data" / "train.jsonl").write_text('{"text": "edited"}\n')
    (project / "params.yaml").write_text("train:\n  steps: 5\nother: 1\n")

    record_pipeline_state(project)

    assert data_md5(project) != before
    assert lock_stage(project)["deps"][0]["md5"] == data_md5(project)
    assert lock_stage(project)["params"]["params.yaml"] == {"train.steps": 5}
    assert dvc_status(project) == {}


def test_record_pipeline_state_limited_to_named_stage(project):
    write_output(project)
    (project / "data" / "train.jsonl").write_text('{"text": "edited"}\n')
    recorded_data = data_md5(project)

    record_pipeline_state(project, stages=["train"])

    assert data_md5(project) == recorded_data, "data.dvc was not a target"
    assert lock_stage(project)["deps"][0]["md5"] != recorded_data


def test_record_pipeline_state_fails_clearly_when_an_output_is_missing(project):
    with pytest.raises(VersioningError, match=r"dvc commit --force .*failed.*out"):
        record_pipeline_state(project)


def test_push_sends_cache_to_remote_and_pull_restores(project, tmp_path):
    write_output(project, "adapter weights")
    record_pipeline_state(project)

    assert push_outputs(project) == "local"

    remote_files = [path for path in (tmp_path / "remote").rglob("*") if path.is_file()]
    assert len(remote_files) >= 4  # two directory manifests + one file in each of data/ and out/
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "out")
    dvc(project, "pull", "-q")
    assert (project / "out" / "result.txt").read_text() == "adapter weights"
    assert dvc_status(project) == {}


def test_push_without_a_default_remote_says_how_to_add_one(project):
    dvc(project, "remote", "remove", "local")

    with pytest.raises(VersioningError, match="no default DVC remote.*dvc remote add -d"):
        push_outputs(project)


def test_push_failure_names_the_remote(project):
    with pytest.raises(VersioningError, match="dvc push to remote 'nowhere' failed"):
        push_outputs(project, remote="nowhere")


def test_ensure_default_remote_keeps_an_existing_default(project, tmp_path):
    assert ensure_default_remote(project, tmp_path / "elsewhere", name="other") == "local"
    assert not (tmp_path / "elsewhere").exists()


def test_ensure_default_remote_adds_a_local_directory_remote(project, tmp_path):
    dvc(project, "remote", "remove", "local")

    assert ensure_default_remote(project, tmp_path / "store") == "local"

    assert (tmp_path / "store").is_dir()
    assert Path(dvc(project, "remote", "list").split()[1]).resolve() == (tmp_path / "store").resolve()


def test_data_md5_reads_data_dvc(project):
    recorded = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]

    assert data_md5(project) == recorded


def test_data_md5_without_dvc_file_says_what_to_do(tmp_path):
    with pytest.raises(VersioningError, match="dvc add data"):
        data_md5(tmp_path)


def test_file_md5_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 << 20))

    assert file_md5(path) == hashlib.md5(path.read_bytes()).hexdigest()


def test_lineage_fields(project):
    write_output(project)
    record_pipeline_state(project)
    cfg = LoraopsConfig()

    lineage = collect_lineage(cfg, project, base_model="tiny-llama", base_revision="abc123")

    assert lineage.git_commit == sh(project, "git", "rev-parse", "HEAD").strip()
    assert lineage.git_dirty is False, "dvc.lock written by the run is recorded by hash, not as dirty code"
    assert lineage.data_md5 == data_md5(project)
    assert lineage.dvc_lock_md5 == file_md5(project / "dvc.lock")
    assert lineage.params_hash == cfg.params_hash()
    assert (lineage.base_model, lineage.base_revision) == ("tiny-llama", "abc123")


def test_lineage_dirty_flag_flips_when_tracked_code_changes(project):
    write_output(project)
    record_pipeline_state(project)
    git_commit(project, "record lock")
    (project / "untracked.txt").write_text("scratch")
    assert collect_lineage(LoraopsConfig(), project, "m", None).git_dirty is False

    (project / "train.py").write_text("print('edited')\n")

    assert collect_lineage(LoraopsConfig(), project, "m", None).git_dirty is True


def test_lineage_requires_recorded_pipeline_state(project):
    with pytest.raises(VersioningError, match="record_pipeline_state"):
        collect_lineage(LoraopsConfig(), project, "m", None)


def test_git_state_outside_a_repository_is_unknown_and_dirty(tmp_path):
    assert git_state(tmp_path) == ("unknown", True)


# --- the data check `make demo` runs: by content, so a fresh clone (no DVC cache) passes --------


def fresh_clone(project: Path, target: Path) -> Path:
    """A git clone of the project: no DVC cache, no data/; data/ rebuilt byte for byte, as import-data does."""
    sh(project.parent, "git", "clone", "-q", str(project), str(target))
    shutil.copytree(project / "data", target / "data")
    return target


def test_check_data_passes_a_fresh_clone_whose_rebuilt_data_is_identical(project, tmp_path):
    from typer.testing import CliRunner

    from loraops.cli.app import app
    from loraops.lineage.versioning import tracked_data_problem

    clone = fresh_clone(project, tmp_path / "clone")
    status = json.loads(dvc(clone, "status", "--json", "data.dvc"))
    assert status == {"data.dvc": [{"changed outs": {"data": "not in cache"}}]}, "dvc status can't tell"
    assert tracked_data_problem(clone) is None
    result = CliRunner().invoke(app, ["check-data", str(clone / "data.dvc")])
    assert result.exit_code == 0, result.output
    assert not (clone / ".dvc" / "cache").exists() or not any((clone / ".dvc" / "cache").rglob("*.dir")), "check wrote"


def test_check_data_refuses_changed_data_on_a_fresh_clone(project, tmp_path):
    from typer.testing import CliRunner

    from loraops.cli.app import app

    clone = fresh_clone(project, tmp_path / "clone")
    (clone / "data" / "train.jsonl").write_text('{"text": "hello, changed"}\n')
    result = CliRunner().invoke(app, ["check-data", str(clone / "data.dvc")])
    assert result.exit_code == 1
    assert f"{clone / 'data'} differs from what {clone / 'data.dvc'} records" in result.output
    assert "dvc checkout data.dvc" in result.output
    assert "Traceback" not in result.output


def test_check_data_names_the_changed_missing_and_added_files_when_the_cache_has_the_listing(project):
    from loraops.lineage.versioning import tracked_data_problem

    (project / "data" / "extra.jsonl").write_text('{"text": "new"}\n')
    assert "added: extra.jsonl" in tracked_data_problem(project)
    (project / "data" / "train.jsonl").write_text('{"text": "edited"}\n')
    assert "changed: train.jsonl" in tracked_data_problem(project)
    (project / "data" / "train.jsonl").unlink()
    assert "missing: train.jsonl" in tracked_data_problem(project)
    shutil.rmtree(project / "data")
    assert "is missing: run `dvc pull data.dvc`" in tracked_data_problem(project)
