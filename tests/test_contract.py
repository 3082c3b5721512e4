"""The Great Expectations data contract: good data passes, each defect fails the right rule at the right line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraops.contract import DataContractError, format_report, validate_dataset
from loraops.data import load_split
from loraops.results import ContractCheck, ContractReport

BAD = Path(__file__).parent / "fixtures" / "bad"
MAX_LENGTH = 100  # the tiny fixture rows are ~55 tokens; bad/train.jsonl:9 is far longer


def check(report: ContractReport, split: str, expectation: str) -> ContractCheck:
    return next(item for item in report.checks if item.split == split and item.expectation == expectation)


def failing_lines(item: ContractCheck) -> list[int]:
    return [int(example.split(":")[1]) for example in item.examples]


@pytest.fixture
def good_report(tiny_data_dir, tiny_tokenizer, tmp_path) -> ContractReport:
    train = load_split(tiny_data_dir / "train.jsonl")
    validation = load_split(tiny_data_dir / "validation.jsonl")
    return validate_dataset(train, validation, tiny_tokenizer, MAX_LENGTH, tmp_path / "reports")


@pytest.fixture(scope="module")
def bad_report(tiny_tokenizer, tmp_path_factory) -> ContractReport:
    train = load_split(BAD / "train.jsonl")
    validation = load_split(BAD / "validation.jsonl")
    return validate_dataset(train, validation, tiny_tokenizer, MAX_LENGTH, tmp_path_factory.mktemp("reports"))


def test_good_data_passes_every_check(good_report):
    assert good_report.passed, format_report(good_report)
    assert (good_report.train_rows, good_report.validation_rows, good_report.format) == (48, 12, "chat")
    names = {item.expectation for item in good_report.checks}
    assert {"no_empty_content", "roles_valid", "max_token_length", "no_duplicates", "no_train_overlap"} <= names


def test_reports_are_written(good_report):
    full = Path(good_report.report_path)
    gx_result = json.loads(full.read_text())
    summary = ContractReport.read_json(full.with_name("data_contract_summary.json"))

    assert full.name == "data_contract.json"
    assert gx_result["train"]["success"] and len(gx_result["validation"]["results"]) >= 8
    assert summary == good_report


@pytest.mark.parametrize(
    ("split", "expectation", "lines", "reason"),
    [
        ("train", "required_fields", [8], "'content' is int"),
        ("train", "no_empty_content", [3, 4, 10], "is empty"),  # "", null, whitespace-only
        ("train", "roles_valid", [5], "unknown role(s) ['human']"),
        ("train", "ends_with_assistant", [6], "last turn is 'user'"),
        ("train", "max_token_length", [9], f"tokens > max_length {MAX_LENGTH}"),
        ("train", "no_duplicates", [1, 7], "same example as line(s)"),
        ("validation", "no_train_overlap", [2, 3], "also in"),
    ],
)
def test_each_defect_fails_its_rule_at_its_line(bad_report, split, expectation, lines, reason):
    item = check(bad_report, split, expectation)

    assert not item.passed
    assert failing_lines(item) == lines
    assert item.observed.startswith(f"{len(lines)} of ")
    assert reason in item.examples[0]
    assert item.examples[0].startswith(str(BAD / f"{split}.jsonl"))


def test_null_and_whitespace_content_are_named(bad_report):
    examples = check(bad_report, "train", "no_empty_content").examples

    assert examples[1].endswith("content of message 2 (assistant) is null")
    assert examples[2].endswith("content of message 1 (user) is whitespace-only")


def test_leakage_names_the_train_line(bad_report):
    examples = check(bad_report, "validation", "no_train_overlap").examples

    assert examples[0].endswith(f"question 'what is two plus two?' also in {BAD / 'train.jsonl'}:2")
    assert examples[1].endswith(f"answer 'one plus one is two.' also in {BAD / 'train.jsonl'}:1")


def test_defects_do_not_spill_into_other_rules(bad_report):
    assert not bad_report.passed
    failed = {(item.split, item.expectation) for item in bad_report.failures()}
    assert failed == {
        ("train", "required_fields"),
        ("train", "no_empty_content"),
        ("train", "roles_valid"),
        ("train", "ends_with_assistant"),
        ("train", "max_token_length"),
        ("train", "no_duplicates"),
        ("validation", "no_train_overlap"),
    }


def test_empty_split_fails_row_count(tiny_data_dir, tiny_tokenizer, tmp_path):
    empty = tmp_path / "validation.jsonl"
    empty.write_text("")

    report = validate_dataset(
        load_split(tiny_data_dir / "train.jsonl"), load_split(empty), tiny_tokenizer, MAX_LENGTH, tmp_path
    )

    item = check(report, "validation", "has_rows")
    assert not item.passed and item.observed == "0 rows"
    assert [(failure.split, failure.expectation) for failure in report.failures()] == [("validation", "has_rows")]


def test_small_max_length_fails_every_row(tiny_data_dir, tiny_tokenizer, tmp_path):
    train = load_split(tiny_data_dir / "train.jsonl")

    report = validate_dataset(train, load_split(tiny_data_dir / "validation.jsonl"), tiny_tokenizer, 10, tmp_path)

    item = check(report, "train", "max_token_length")
    assert item.observed == "48 of 48 rows unexpected" and failing_lines(item) == [1, 2, 3, 4, 5]


def test_alpaca_and_text_data(tmp_path, tiny_tokenizer):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        '{"instruction": "Add", "input": "2 and 3", "output": "5"}\n{"instruction": "Add", "input": "", "output": ""}\n'
    )
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "one two"}\n')

    report = validate_dataset(load_split(alpaca), load_split(text), tiny_tokenizer, MAX_LENGTH, tmp_path)

    assert check(report, "train", "no_empty_content").examples == [f"{alpaca}:2: field 'output' is empty"]
    assert not any(item.split == "validation" and item.expectation == "roles_valid" for item in report.checks)
    assert not check(report, "validation", "same_format_kind").passed


def test_format_report_and_error(bad_report, good_report):
    text = format_report(bad_report)
    error = DataContractError(bad_report)

    assert text.splitlines()[0].startswith("Data contract FAILED (format chat; 10 train / 3 validation rows)")
    assert "PASS train      tokenizes" in text
    assert f"       {BAD / 'train.jsonl'}:5: roles human, assistant" in text
    assert error.report is bad_report
    assert "FAIL validation no_train_overlap" in str(error) and "PASS" not in str(error)
    assert format_report(good_report).startswith("Data contract PASSED")


def test_template_that_raises_is_reported_per_row(tiny_data_dir, tiny_tokenizer, tmp_path):
    import copy

    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tiny_tokenizer.chat_template
    )
    train = tmp_path / "train.jsonl"
    rows = (tiny_data_dir / "train.jsonl").read_text().splitlines()[:3]
    system = {"role": "system", "content": "Be terse."}
    rows[1] = json.dumps({"messages": [system, *json.loads(rows[1])["messages"]]})
    train.write_text("\n".join(rows) + "\n")

    report = validate_dataset(
        load_split(train), load_split(tiny_data_dir / "validation.jsonl"), strict, MAX_LENGTH, tmp_path
    )

    item = check(report, "train", "tokenizes")
    assert failing_lines(item) == [2] and "System role not supported" in item.examples[0]
    assert check(report, "train", "roles_valid").passed  # a leading system turn is a valid role order


def test_imported_chatterbot_data_passes(tiny_tokenizer, tmp_path):
    from loraops.config import ImportConfig
    from loraops.data import import_chatterbot

    summary = import_chatterbot(ImportConfig(output_dir=str(tmp_path / "data")))
    train, validation = load_split(summary["train_path"]), load_split(summary["validation_path"])

    # The tiny tokenizer splits unseen words into bytes, so lengths are only bounded loosely here.
    report = validate_dataset(train, validation, tiny_tokenizer, 100_000, tmp_path / "reports")

    assert report.passed, format_report(report, failures_only=True)
    assert (report.train_rows, report.validation_rows) == (summary["train_rows"], summary["validation_rows"])
