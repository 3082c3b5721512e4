"""The GX file context in gx/: its suites load with GX's own API, every rule fails through the real suite,
a user-added expectation is enforced and named, and Data Docs show observed values with file and line."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_project

from loraops.config import DataConfig
from loraops.contract import DataContractError, format_report, validate_dataset
from loraops.data.formats import DataError
from loraops.results import ContractCheck, ContractReport

REPO = Path(__file__).resolve().parent.parent
GX_DIR = REPO / "gx"
BAD = Path(__file__).parent / "fixtures" / "bad"
GOOD = Path(__file__).parent / "fixtures" / "data"
CHAT_RULES = [
    "min_rows", "required_fields", "empty_content", "roles", "ends_with_assistant", "encoding", "tokenizes",
    "over_length", "duplicates", "train_overlap", "secrets", "emails",
]  # fmt: skip


def check(report: ContractReport, split: str, expectation: str) -> ContractCheck:
    return next(item for item in report.checks if item.split == split and item.expectation == expectation)


def gx_result(report: ContractReport, split: str, rule: str) -> dict:
    """The raw GX result of one built-in rule, as data_contract.json stores it."""
    raw = json.loads(Path(report.report_path).read_text())
    return next(item for item in raw[split]["results"] if item["expectation_config"]["meta"].get("rule") == rule)


def copy_gx(tmp_path: Path) -> Path:
    target = tmp_path / "gx"
    shutil.copytree(GX_DIR, target, ignore=shutil.ignore_patterns("uncommitted"))
    return target


def add_expectations(gx_dir: Path, fmt: str, *entries: dict) -> Path:
    suite = gx_dir / "expectations" / f"{fmt}.json"
    content = json.loads(suite.read_text())
    content["expectations"] += list(entries)
    suite.write_text(json.dumps(content, indent=2))
    return suite


def chat(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


@pytest.fixture(scope="module")
def bad_report(tiny_tokenizer, tmp_path_factory) -> ContractReport:
    reports = tmp_path_factory.mktemp("reports")
    return validate_dataset(
        BAD / "train.jsonl", BAD / "validation.jsonl", tiny_tokenizer, DataConfig(max_length=100), reports
    )


def test_suites_load_with_gx_api_and_run_through_their_checkpoint(tmp_path):
    """GX's own file context reads the committed suites and checkpoints; the chat checkpoint finds line 5's roles."""
    import great_expectations as gx

    import loraops.contract.expectations  # noqa: F401  registers the custom expectations
    from loraops.contract import mark_duplicates, scan_split
    from loraops.contract.table import example_frame

    context = gx.get_context(mode="file", project_root_dir=str(copy_gx(tmp_path).parent))
    rules = {
        fmt: [item.meta["rule"] for item in context.suites.get(fmt).expectations] for fmt in ("chat", "alpaca", "text")
    }
    assert rules["chat"] == rules["alpaca"] == CHAT_RULES
    assert rules["text"] == [rule for rule in CHAT_RULES if rule not in ("roles", "ends_with_assistant")]
    assert {item.name for item in context.checkpoints.all()} == {"chat", "alpaca", "text"}

    facts = scan_split("train", BAD / "train.jsonl", DataConfig(), None)
    mark_duplicates(facts, normalized=True)
    frame = example_frame(facts, facts.column("line") > 0)
    result = context.checkpoints.get("chat").run(
        batch_parameters={"dataframe": frame},
        expectation_parameters={"min_rows": 1, "max_length": 100},
    )

    suite_result = next(iter(result.run_results.values()))
    by_rule = {item.expectation_config.meta["rule"]: item for item in suite_result.results}
    assert not result.success and by_rule["min_rows"].success and by_rule["secrets"].success
    assert by_rule["roles"].result["partial_unexpected_index_list"] == [
        {"roles": "human,assistant", "file": str(BAD / "train.jsonl"), "line": 5}
    ]
    assert (tmp_path / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()


@pytest.mark.parametrize(
    ("train", "validation", "split", "rule", "lines"),
    [
        ("train.jsonl", "validation.jsonl", "train", "required_fields", [8]),
        ("train.jsonl", "validation.jsonl", "train", "empty_content", [3, 4, 10]),
        ("train.jsonl", "validation.jsonl", "train", "roles", [5]),
        ("train.jsonl", "validation.jsonl", "train", "ends_with_assistant", [6]),
        ("train.jsonl", "validation.jsonl", "train", "over_length", [9]),
        ("train.jsonl", "validation.jsonl", "train", "duplicates", [7]),
        ("train.jsonl", "validation.jsonl", "validation", "train_overlap", [2, 3]),
        ("encoding.jsonl", None, "train", "encoding", [2, 3, 4]),
        ("secrets.jsonl", None, "train", "secrets", [1, 2, 3, 4]),
        ("secrets.jsonl", None, "train", "emails", [5]),
        ("train.jsonl", "empty.jsonl", "validation", "min_rows", []),
    ],
)
def test_each_rule_fails_through_the_real_gx_suite(train, validation, split, rule, lines, tiny_tokenizer, tmp_path):
    validation_path = BAD / validation if validation else None
    report = validate_dataset(BAD / train, validation_path, tiny_tokenizer, DataConfig(max_length=100), tmp_path)

    item = gx_result(report, split, rule)
    listed = item["result"].get("partial_unexpected_index_list", [])
    assert item["success"] is False and [row["line"] for row in listed] == lines
    assert {row["file"] for row in listed} <= {str(BAD / (train if split == "train" else validation))}
    assert not check(report, split, rule).passed


def test_a_user_added_expectation_is_enforced_and_named(tmp_path, tiny_tokenizer, tiny_model_dir, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from loraops.cli.app import app

    gx_dir = copy_gx(tmp_path)
    suite = add_expectations(
        gx_dir,
        "chat",
        {"type": "expect_column_values_to_not_match_regex", "kwargs": {"column": "completion", "regex": "(?i)as an ai"},
         "meta": {"name": "no_as_an_ai"}},
        {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "prompt", "max_value": 40},
         "severity": "warning"},
    )  # fmt: skip
    train = tmp_path / "train.jsonl"
    rows = [chat("What is one plus one?", "Two."), chat("Tell me a joke", "As an AI, I cannot laugh."),
            chat("What is the longest river in the whole wide world?", "The Nile.")]  # fmt: skip
    train.write_text("\n".join(rows) + "\n")
    config = DataConfig(max_length=100, contract={"gx_dir": str(gx_dir)})

    report = validate_dataset(train, GOOD / "validation.jsonl", tiny_tokenizer, config, tmp_path / "reports")

    enforced = check(report, "train", "no_as_an_ai")
    assert not report.passed and not enforced.passed and enforced.severity == "fail"
    assert enforced.examples == [f"{train}:2: completion = 'As an AI, I cannot laugh.'"]
    assert str(suite) in enforced.hint
    warned = check(report, "train", "expect_column_value_lengths_to_be_between(prompt)")
    assert not warned.passed and warned.severity == "warn" and warned.examples[0].startswith(f"{train}:3: prompt = ")
    assert [(item.split, item.expectation) for item in report.failures()] == [("train", "no_as_an_ai")]
    assert "FAIL train      no_as_an_ai" in str(DataContractError(report))
    assert "WARN train      expect_column_value_lengths_to_be_between(prompt)" in format_report(report)
    plain = validate_dataset(
        train, GOOD / "validation.jsonl", tiny_tokenizer, DataConfig(max_length=100), tmp_path / "r2"
    )
    assert plain.passed, format_report(plain)  # the shipped suite has neither rule

    params = tmp_path / "params.yaml"  # `loraops validate` enforces it too, from data.contract.gx_dir
    params.write_text(
        yaml.safe_dump({"model": {"base": str(tiny_model_dir)}, "data": {"contract": {"gx_dir": str(gx_dir)}}})
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    command = ["validate", str(train), "--validation", str(GOOD / "validation.jsonl"), "--params", str(params)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "FAIL train      no_as_an_ai" in result.output
    assert f"{train}:2: completion = 'As an AI, I cannot laugh.'" in result.output


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "text", "mostly": 0.9},
          "meta": {"rule": "required_fields"}},
         "set data.contract.required_fields.max_share and .severity in params.yaml"),
        ({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "text"}, "meta": {"rule": "no_nulls"}},
         "meta.rule 'no_nulls' is not a loraops rule"),
        ({"type": "expect_column_values_to_be_shiny", "kwargs": {"column": "text"}},
         "expectation 13 (expect_column_values_to_be_shiny): GX cannot load it"),
        ({"type": "expect_column_values_to_be_between", "kwargs": {"min_value": 1}},
         "expectation 13 (expect_column_values_to_be_between)"),
    ],
)  # fmt: skip
def test_a_broken_suite_file_is_refused_naming_the_file(entry, message, tmp_path):
    gx_dir = copy_gx(tmp_path)
    suite = add_expectations(gx_dir, "chat", entry)
    config = DataConfig(contract={"gx_dir": str(gx_dir)})

    with pytest.raises(DataError, match=re.escape(message)) as caught:
        validate_dataset(GOOD / "train.jsonl", GOOD / "validation.jsonl", None, config, tmp_path / "reports")
    assert str(caught.value).startswith(str(suite))
    assert not (tmp_path / "reports" / "data_contract_summary.json").exists()


def test_a_gx_dir_without_a_context_is_refused(tmp_path):
    config = DataConfig(contract={"gx_dir": str(tmp_path / "nowhere")})

    with pytest.raises(DataError, match="data.contract.gx_dir: .*nowhere has no great_expectations.yml"):
        validate_dataset(GOOD / "train.jsonl", GOOD / "validation.jsonl", None, config, tmp_path / "reports")


def test_data_docs_show_observed_values_with_file_and_line(bad_report):
    docs = Path(bad_report.data_docs).parent
    page = next((docs / "validations" / "chat_train").rglob("*.html")).read_text()
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))
    train = str(BAD / "train.jsonl")

    assert f"Unexpected Value Count file line human,assistant 1 {train} 5" in text  # roles
    assert f"user,assistant,user 1 {train} 6" in text  # ends_with_assistant
    assert re.search(rf"EMPTY 1 {re.escape(train)} 8|null 1 {re.escape(train)} 8", text)  # required_fields: no text
    assert "Tokens after the chat template: at most data.max_length" in text
    assert (docs / "index.html").is_file()


def test_the_pipeline_stage_enforces_the_projects_suite_and_dvc_sees_the_edit(tmp_path, tiny_model_dir):
    """A project's own gx/ (not the working directory's) drives the stage; a suite edit makes validate_dataset stale."""
    import subprocess
    import sys

    from loraops import stages
    from loraops.lineage.versioning import record_pipeline_state
    from loraops.project.params_file import load_config

    root = make_project(tmp_path / "project", tiny_model_dir)
    cfg = load_config(root / "params.yaml")
    stages.prepare_base_model(cfg, root)
    stages.validate_dataset(cfg, root)
    record_pipeline_state(root, ["prepare_base_model", "validate_dataset"])
    dvc = [sys.executable, "-m", "dvc", "status", "--json", "validate_dataset"]
    assert json.loads(subprocess.run(dvc, cwd=root, capture_output=True, text=True, check=True).stdout) == {}

    add_expectations(
        root / "gx", "chat",
        {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "completion", "max_value": 10},
         "meta": {"name": "short_answers"}},
    )  # fmt: skip
    with pytest.raises(DataContractError, match="FAIL train      short_answers") as caught:
        stages.validate_dataset(cfg, root)

    assert f"{root / 'data' / 'train.jsonl'}:1: completion = " in str(caught.value)
    status = json.loads(subprocess.run(dvc, cwd=root, capture_output=True, text=True, check=True).stdout)
    assert {"changed deps": {"gx/expectations": "modified"}} in status["validate_dataset"]


def test_chunked_validation_gives_the_verdicts_and_counts_of_one_piece(tmp_path, tiny_tokenizer, caplog):
    """GX validates 4 rows at a time (read in ~300-byte batches); merged, the results equal one whole-table run.

    Line 7 repeats line 1 and line 11 repeats line 2 from other chunks; the user's expectation fails in
    the first chunk on its own (1 of 3 answers, over its 30%) but not over the split (2 of 9).
    """
    gx_dir = copy_gx(tmp_path)
    add_expectations(
        gx_dir, "chat",
        {"type": "expect_column_values_to_not_match_regex",
         "kwargs": {"column": "completion", "regex": "Two plus two", "mostly": 0.7}, "meta": {"name": "no_two"}},
    )  # fmt: skip
    train = tmp_path / "train.jsonl"
    lines = (BAD / "train.jsonl").read_text().splitlines()
    train.write_text("\n".join([*lines, lines[1], chat("What is nine plus one?", "Ten.")]) + "\n")

    def run(name: str, **contract) -> tuple[ContractReport, dict]:
        config = DataConfig(max_length=100, contract={"gx_dir": str(gx_dir), "quarantine": ["over_length"], **contract})
        report = validate_dataset(train, BAD / "validation.jsonl", tiny_tokenizer, config, tmp_path / name)
        return report, json.loads(Path(report.report_path).read_text())

    whole, whole_raw = run("whole", chunk_rows=0)
    with caplog.at_level(logging.INFO, logger="loraops.contract.chunks"):
        chunked, chunked_raw = run("chunked", chunk_rows=4, chunk_mb=300 / 2**20)
    assert "train: GX validated 11 rows in 3 chunk(s)" in caplog.messages

    def verdicts(report: ContractReport) -> list[tuple]:
        return [(c.split, c.expectation, c.passed, c.observed, c.examples) for c in report.checks]

    assert verdicts(chunked) == verdicts(whole)
    assert check(chunked, "train", "duplicates").examples == [
        f"{train}:7: same example as line 1 after normalising case and whitespace",
        f"{train}:11: same example as line 2",
    ]
    assert check(chunked, "train", "no_two").passed and check(chunked, "train", "no_two").observed.startswith("2 of ")
    assert (
        not check(chunked, "train", "roles").passed
        and check(chunked, "train", "min_rows").observed == "11 rows; 1 quarantined"
    )
    keys = ("element_count", "unexpected_count", "missing_count", "partial_unexpected_index_list", "observed_value")
    for split in ("train", "validation"):
        assert chunked_raw[split]["statistics"] == whole_raw[split]["statistics"]
        for ours, theirs in zip(chunked_raw[split]["results"], whole_raw[split]["results"], strict=True):
            assert ours["success"] == theirs["success"]
            assert {key: ours["result"].get(key) for key in keys} == {key: theirs["result"].get(key) for key in keys}
    quarantined = [tmp_path / name / "quarantine" / "train.jsonl" for name in ("whole", "chunked")]
    assert quarantined[0].read_text() == quarantined[1].read_text() and '"line": 9' in quarantined[1].read_text()
    site = Path(chunked.data_docs).parent  # one merged result per split; no page per chunk or quarantine pass
    pages = sorted(path.relative_to(site).parts[:2] for path in site.rglob("*.html") if path.name != "index.html")
    assert pages == [("expectations", "chat_train.html"), ("expectations", "chat_validation.html"),
                     ("validations", "chat_train"), ("validations", "chat_validation")]  # fmt: skip
    docs = site / "validations" / "chat_train"
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", next(docs.rglob("*.html")).read_text())))
    assert f"human,assistant 1 {train} 5" in text and f"2 1 {train} 11" in text  # chunks 2 and 3, with file:line


def test_the_quarantine_sets_aside_the_rows_the_suite_finds(tmp_path):
    """The quarantine follows the suite's expectation (here an edited ``emails`` regex), not a second check."""
    gx_dir = copy_gx(tmp_path)
    suite = gx_dir / "expectations" / "chat.json"
    content = json.loads(suite.read_text())
    emails = next(entry for entry in content["expectations"] if entry["meta"].get("rule") == "emails")
    emails["kwargs"]["regex"] = r"@example\.org"  # the team only minds one domain
    suite.write_text(json.dumps(content, indent=2))
    train = tmp_path / "train.jsonl"
    rows = [chat("Who?", "Write to ann@example.com."), chat("And?", "Write to bob@example.org."), chat("Ok?", "Yes.")]
    train.write_text("\n".join(rows) + "\n")
    config = DataConfig(contract={"gx_dir": str(gx_dir), "quarantine": ["emails"]})

    report = validate_dataset(train, None, None, config, tmp_path / "reports")

    record = report.quarantine["train"]
    aside = [json.loads(line) for line in Path(record.path).read_text().splitlines()]
    assert [row["line"] for row in aside] == [2] and record.by_rule == {"emails": 1}
    assert aside[0]["reasons"] == ["emails: e-mail address 'b***@example.org' in content of message 2 (assistant)"]
    assert check(report, "train", "emails").observed == "0 of 2 rows (0.0%); 1 quarantined"


def test_an_expectation_over_the_whole_column_validates_the_split_in_one_piece(tmp_path, caplog):
    """Uniqueness cannot be merged from chunks: the split is validated in one piece, with a warning."""
    gx_dir = copy_gx(tmp_path)
    add_expectations(
        gx_dir, "chat",
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "completion"}, "meta": {"name": "unique"}},
    )  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([chat("One?", "Same."), chat("Two?", "Other."), chat("Three?", "Same.")]) + "\n")
    config = DataConfig(contract={"gx_dir": str(gx_dir), "chunk_rows": 2})

    with caplog.at_level(logging.INFO, logger="loraops.contract.chunks"):
        report = validate_dataset(train, None, None, config, tmp_path / "reports")

    assert "train: unique needs the whole column at once" in caplog.text
    assert "train: GX validated 3 rows in 1 chunk(s)" in caplog.messages
    unique = check(report, "train", "unique")
    assert not unique.passed and unique.examples == [
        f"{train}:1: completion = 'Same.'",
        f"{train}:3: completion = 'Same.'",
    ]
