"""The Great Expectations data contract: good data passes, each defect fails the right rule at the right line.

Per-row facts (``scan_split``) are tested without GX, which is fast; a few whole contract runs
check thresholds, severities, quarantine, reports and Data Docs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loraops.config import DataConfig, LoraopsConfig
from loraops.contract import (
    DataContractError,
    TrainIndex,
    format_report,
    mark_duplicates,
    quarantined_lines,
    scan_split,
    validate_dataset,
)
from loraops.data.formats import DataError
from loraops.results import ContractCheck, ContractReport

BAD = Path(__file__).parent / "fixtures" / "bad"
GOOD = Path(__file__).parent / "fixtures" / "data"
MAX_LENGTH = 100  # the tiny fixture rows are ~55 tokens; bad/train.jsonl:9 is far longer


def check(report: ContractReport, split: str, expectation: str) -> ContractCheck:
    return next(item for item in report.checks if item.split == split and item.expectation == expectation)


def failing_lines(item: ContractCheck) -> list[int]:
    return [int(example.split(":")[1]) for example in item.examples]


def data_config(**contract) -> DataConfig:
    return DataConfig(max_length=MAX_LENGTH, contract=contract)


def flagged(facts, rule: str) -> list[int]:
    return [int(line) for line in facts.column("line")[facts.column(rule)]]


@pytest.fixture(scope="module")
def good_report(tiny_tokenizer, tmp_path_factory) -> ContractReport:
    reports = tmp_path_factory.mktemp("reports")
    return validate_dataset(GOOD / "train.jsonl", GOOD / "validation.jsonl", tiny_tokenizer, data_config(), reports)


@pytest.fixture(scope="module")
def bad_report(tiny_tokenizer, tmp_path_factory) -> ContractReport:
    reports = tmp_path_factory.mktemp("reports")
    return validate_dataset(BAD / "train.jsonl", BAD / "validation.jsonl", tiny_tokenizer, data_config(), reports)


# --- whole contract runs -------------------------------------------------------------------


def test_good_data_passes_every_check(good_report):
    assert good_report.passed, format_report(good_report)
    assert (good_report.train_rows, good_report.validation_rows, good_report.format) == (48, 12, "chat")
    names = {item.expectation for item in good_report.checks}
    assert names == {
        "min_rows", "required_fields", "empty_content", "roles", "ends_with_assistant", "encoding", "tokenizes",
        "over_length", "duplicates", "train_overlap", "secrets", "emails", "same_format_kind",
    }  # fmt: skip
    assert good_report.quarantine == {}


def test_reports_and_data_docs_are_written(good_report):
    full = Path(good_report.report_path)
    gx_result = json.loads(full.read_text())
    summary = ContractReport.read_json(full.with_name("data_contract_summary.json"))
    docs = Path(good_report.data_docs)

    assert full.name == "data_contract.json"
    assert gx_result["train"]["success"] and len(gx_result["validation"]["results"]) == 12
    assert summary == good_report
    assert docs == full.parent / "data_docs" / "index.html" and docs.is_file()
    pages = {path.parent.parent.parent.name for path in (docs.parent / "validations").rglob("*.html")}
    assert pages == {"chat_train", "chat_validation"}  # suite gx/expectations/chat.json, run per split
    page = next((docs.parent / "validations" / "chat_train").rglob("*.html")).read_text()
    assert "shortest_turn" in page and "roles" in page and "n_tokens" in page


@pytest.mark.parametrize(
    ("split", "expectation", "lines", "reason"),
    [
        ("train", "required_fields", [8], "'content' is int"),
        ("train", "empty_content", [3, 4, 10], "is empty"),  # "", null, whitespace-only
        ("train", "roles", [5], "unknown role(s) ['human']"),
        ("train", "ends_with_assistant", [6], "last turn is 'user'"),
        ("train", "over_length", [9], f"tokens > max_length {MAX_LENGTH}"),
        ("train", "duplicates", [7], "same example as line 1 after normalising case and whitespace"),
        ("validation", "train_overlap", [2, 3], "also in"),
    ],
)
def test_each_defect_fails_its_rule_at_its_line(bad_report, split, expectation, lines, reason):
    item = check(bad_report, split, expectation)

    assert not item.passed and item.severity == "fail"
    assert failing_lines(item) == lines
    assert item.observed.startswith(f"{len(lines)} of ")
    assert reason in item.examples[0]
    assert item.examples[0].startswith(str(BAD / f"{split}.jsonl"))
    assert item.hint and f"data.contract.quarantine: [{expectation}]" in item.hint


def test_observed_and_threshold_say_what_was_measured(bad_report):
    lengths = check(bad_report, "train", "over_length")
    empty = check(bad_report, "train", "empty_content")

    assert lengths.observed == "1 of 4 tokenised rows (25.0%)"  # only well-formed rows are tokenised
    assert lengths.threshold == f"n_tokens <= {MAX_LENGTH}; truncated: no rows"
    assert (empty.observed, empty.threshold) == ("3 of 10 rows (30.0%)", "no rows")
    assert check(bad_report, "train", "min_rows").observed == "10 rows"


def test_null_and_whitespace_content_are_named(bad_report):
    examples = check(bad_report, "train", "empty_content").examples

    assert examples[1].endswith("content of message 2 (assistant) is null")
    assert examples[2].endswith("content of message 1 (user) is whitespace-only")


def test_leakage_names_the_train_line(bad_report):
    examples = check(bad_report, "validation", "train_overlap").examples

    assert examples[0].endswith(f"question 'what is two plus two?' also in {BAD / 'train.jsonl'}:2")
    assert examples[1].endswith(f"answer 'one plus one is two.' also in {BAD / 'train.jsonl'}:1")


def test_defects_do_not_spill_into_other_rules(bad_report):
    assert not bad_report.passed
    failed = {(item.split, item.expectation) for item in bad_report.failures()}
    assert failed == {
        ("train", "required_fields"),
        ("train", "empty_content"),
        ("train", "roles"),
        ("train", "ends_with_assistant"),
        ("train", "over_length"),
        ("train", "duplicates"),
        ("validation", "train_overlap"),
    }


def test_format_report_and_error(bad_report, good_report):
    text = format_report(bad_report)
    error = DataContractError(bad_report)

    assert text.splitlines()[0].startswith("Data contract FAILED (format chat; 10 train / 3 validation rows)")
    assert "PASS train      tokenizes" in text
    assert f"       {BAD / 'train.jsonl'}:5: roles human, assistant" in text
    assert "       fix: end each conversation with an assistant turn" in text
    assert error.report is bad_report
    assert "FAIL validation train_overlap" in str(error) and "PASS" not in str(error)
    assert format_report(good_report).startswith("Data contract PASSED")


def test_thresholds_and_severities_are_configurable(tiny_tokenizer, tmp_path):
    """25% of the tokenised rows are too long: a 30% allowance passes, 20% fails; warn never stops."""
    loose = data_config(
        over_length={"max_share": 0.3},
        empty_content={"max_share": 0.2},  # 3 of 10 rows are empty: still fails
        required_fields={"severity": "warn"},
        roles={"severity": "warn"},
        ends_with_assistant={"severity": "warn"},
        duplicates={"severity": "warn"},
        train_overlap={"severity": "warn"},
    )

    report = validate_dataset(BAD / "train.jsonl", BAD / "validation.jsonl", tiny_tokenizer, loose, tmp_path)

    assert check(report, "train", "over_length").passed
    assert check(report, "train", "over_length").threshold.endswith("truncated: at most 30.0% of rows")
    assert not check(report, "train", "empty_content").passed
    assert [(item.split, item.expectation) for item in report.failures()] == [("train", "empty_content")]
    assert "WARN train      roles" in format_report(report)
    assert "roles" not in str(DataContractError(report))  # the error lists what stops the run


def test_quarantine_sets_rows_aside_and_training_drops_them(tiny_tokenizer, tmp_path):
    cfg = LoraopsConfig(
        data=DataConfig(
            train_file=str(BAD / "duplicates.jsonl"),
            validation_file=str(GOOD / "validation.jsonl"),
            max_length=80,  # bad/duplicates.jsonl:4 renders to 115 tokens, the others to 63-71
            contract={"quarantine": ["duplicates", "over_length"]},
        )
    )
    reports = tmp_path / cfg.paths.reports_dir

    report = validate_dataset(cfg.data.train_file, cfg.data.validation_file, tiny_tokenizer, cfg.data, reports)

    record = report.quarantine["train"]
    assert report.passed, format_report(report)
    assert (record.rows, record.by_rule) == (3, {"duplicates": 2, "over_length": 1})
    rows = [json.loads(line) for line in Path(record.path).read_text().splitlines()]
    assert [row["line"] for row in rows] == [2, 3, 4]
    assert rows[0] == {"line": 2, "rules": ["duplicates"], "reasons": ["duplicates: same example as line 1"]}
    assert rows[1]["reasons"][0].endswith("line 1 after normalising case and whitespace")
    assert rows[2]["rules"] == ["over_length"] and rows[2]["reasons"] == ["over_length: 115 tokens > max_length 80"]
    assert check(report, "train", "duplicates").observed == "0 of 2 rows (0.0%); 2 quarantined"
    assert check(report, "train", "min_rows").observed == "2 rows; 3 quarantined"
    assert report.quarantine["validation"].rows == 0
    assert f"Quarantined 3 train rows (duplicates 2, over_length 1): {record.path}" in format_report(report)

    from loraops.train.datasets import load_splits

    train, validation = load_splits(cfg, tmp_path)
    assert train.lines == [1, 5] and len(train.examples) == 2 and len(validation) == 12


def test_quarantine_of_other_data_or_an_old_run_is_refused(tiny_tokenizer, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes((BAD / "duplicates.jsonl").read_bytes())
    config = data_config(quarantine=["duplicates"])
    validate_dataset(data, GOOD / "validation.jsonl", tiny_tokenizer, config, tmp_path / "reports")
    assert quarantined_lines(tmp_path / "reports", "train", data) == {2, 3}

    data.write_bytes(data.read_bytes() + (GOOD / "train.jsonl").read_bytes())
    with pytest.raises(DataError, match="rerun `loraops stage validate-dataset`"):
        quarantined_lines(tmp_path / "reports", "train", data)

    validate_dataset(data, GOOD / "validation.jsonl", tiny_tokenizer, data_config(), tmp_path / "reports")
    assert not (tmp_path / "reports" / "quarantine" / "train.jsonl").exists()  # no stale quarantine left


def test_empty_split_fails_min_rows(tiny_tokenizer, tmp_path):
    empty = BAD / "empty.jsonl"

    report = validate_dataset(GOOD / "train.jsonl", empty, tiny_tokenizer, data_config(), tmp_path)

    item = check(report, "validation", "min_rows")
    assert not item.passed and item.observed == "0 rows"
    assert item.examples == [f"{empty}: 0 rows left to train on"] and "data.contract.min_rows.validation" in item.hint
    assert [(failure.split, failure.expectation) for failure in report.failures()] == [("validation", "min_rows")]


def test_alpaca_and_text_data(tmp_path, tiny_tokenizer):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(
        '{"instruction": "Add", "input": "2 and 3", "output": "5"}\n{"instruction": "Add", "input": "", "output": ""}\n'
    )
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "one two"}\n')

    report = validate_dataset(alpaca, text, tiny_tokenizer, data_config(), tmp_path)

    assert check(report, "train", "empty_content").examples == [f"{alpaca}:2: field 'output' is empty"]
    assert not any(item.split == "validation" and item.expectation == "roles" for item in report.checks)
    assert not check(report, "validation", "same_format_kind").passed


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

    report = validate_dataset(train, tiny_data_dir / "validation.jsonl", strict, data_config(), tmp_path)

    item = check(report, "train", "tokenizes")
    assert failing_lines(item) == [2] and "System role not supported" in item.examples[0]
    assert check(report, "train", "roles").passed  # a leading system turn is a valid role order
    assert check(report, "train", "over_length").observed == "0 of 2 tokenised rows (0.0%)"


def test_imported_chatterbot_data_passes(tiny_tokenizer, tmp_path):
    from loraops.config import ImportConfig
    from loraops.data.chatterbot import import_chatterbot

    summary = import_chatterbot(ImportConfig(output_dir=str(tmp_path / "data")))

    # The tiny tokenizer splits unseen words into bytes, so lengths are only bounded loosely here.
    config = DataConfig(max_length=100_000)
    report = validate_dataset(summary["train_path"], summary["validation_path"], tiny_tokenizer, config, tmp_path)

    assert report.passed, format_report(report, failures_only=True)
    assert (report.train_rows, report.validation_rows) == (summary["train_rows"], summary["validation_rows"])


# --- per-row facts, without GX ---------------------------------------------------------------


def test_invalid_utf8_and_control_characters_name_line_and_byte(tiny_tokenizer):
    facts = scan_split("train", BAD / "encoding.jsonl", data_config(), tiny_tokenizer)
    reasons = facts.reasons["encoding"]
    raw = (BAD / "encoding.jsonl").read_bytes().split(b"\n")
    line_starts = np.cumsum([0] + [len(line) + 1 for line in raw])

    assert flagged(facts, "encoding") == [2, 3, 4]
    byte = raw[1].index(b"\xe9")
    assert reasons[2].startswith(
        f"invalid UTF-8 byte 0xe9 at byte {byte} of the line (file offset {line_starts[1] + byte})"
    )
    bell = raw[2].index(b"\x07")
    assert reasons[3] == (
        "control character U+0007 in content of message 1 (user) at character 13 "
        f"(byte {bell} of the line, file offset {line_starts[2] + bell})"
    )
    assert reasons[4].startswith("control character U+0000 in content of message 1 (user) at character 4 (byte ")
    assert flagged(facts, "required_fields") == [] and flagged(facts, "tokenizes") == []


def test_secrets_and_emails_are_flagged_without_repeating_them(tiny_tokenizer):
    facts = scan_split("train", BAD / "secrets.jsonl", data_config(), tiny_tokenizer)
    reasons = facts.reasons["secrets"]

    assert flagged(facts, "secrets") == [1, 2, 3, 4]  # not "ask-me-..." (line 6) or "task-force" (line 7)
    assert flagged(facts, "emails") == [5]
    assert reasons[1] == "OpenAI-style API key ('sk-...') 'sk-pro…' in content of message 1 (user)"
    assert reasons[2].startswith("AWS access key id") and "IOSFODNN7EXAMPLE" not in reasons[2]
    assert reasons[3].startswith("GitHub token") and reasons[4].startswith("private key block")
    assert facts.reasons["emails"][5] == "e-mail address 'j***@example.com' in content of message 2 (assistant)"
    assert DataConfig().contract.emails.severity == "warn" and DataConfig().contract.secrets.severity == "fail"


def test_exact_and_normalised_duplicates(tiny_tokenizer):
    facts = scan_split("train", BAD / "duplicates.jsonl", data_config(), None)

    mark_duplicates(facts, normalized=True)
    assert flagged(facts, "duplicates") == [2, 3]
    assert facts.reasons["duplicates"] == {
        2: "same example as line 1",
        3: "same example as line 1 after normalising case and whitespace",
    }
    mark_duplicates(facts, normalized=False)
    assert flagged(facts, "duplicates") == [2]


def test_turn_keys_agree_with_normalize_text():
    import itertools

    import pyarrow as pa

    from loraops.contract import SplitFacts, Turns, normalized_hashes
    from loraops.contract.keys import keys_of as _keys
    from loraops.contract.patterns import unusual_turns as _unusual_turns
    from loraops.data.keys import normalize_text

    texts = ["Hello there", "hello  there", " hello there", "HELLO\tthere", "hello there\n", "hello\x1fthere",
             "Straße", "STRASSE", "strasse", "café", "CAFÉ", "sk-x", "a@b.co", "hello there", "  Hello \r\n There ",
             "a\x00b", "A\x00B", "x\u00a0y", "x y", "\t"]  # fmt: skip
    content = pa.array(texts)
    normalised = normalized_hashes(content, _unusual_turns(content))
    rows = pa.array([[{"role": "user", "content": text}] for text in texts])
    facts = SplitFacts("train", "-", "chat")
    _keys(facts, Turns.of(rows), np.ones(len(texts), dtype=bool), _unusual_turns(content))
    exact = facts.column("exact_key")

    for a, b in itertools.combinations(range(len(texts)), 2):
        same = normalize_text(texts[a]) == normalize_text(texts[b])
        assert (normalised[a] == normalised[b]) == same, (texts[a], texts[b])
        assert (exact[a] == exact[b]) == (texts[a] == texts[b]), (texts[a], texts[b])


def test_contract_markdown_shows_every_check_and_the_quarantine(bad_report):
    from loraops.cli.reporting import contract_markdown

    text = contract_markdown(bad_report)

    assert "| expectation | split | severity | result | observed | threshold |" in text
    assert "| over_length | train | fail | **fail** | 1 of 4 tokenised rows (25.0%) | n_tokens <= 100; " in text
    assert "| emails | train | warn | pass |" in text
    assert f"  - `{BAD / 'train.jsonl'}:5: roles human, assistant" in text
    assert text.endswith(f"Great Expectations Data Docs: `{bad_report.data_docs}`")


def test_leakage_checks_question_answer_and_whole_example(tmp_path):
    train = tmp_path / "train.jsonl"
    validation = tmp_path / "validation.jsonl"
    rows = [("Q one", "A one"), ("Q two", "A two"), ("Q three", "A three")]
    train.write_text("".join(json.dumps(_chat(q, a)) + "\n" for q, a in rows))
    validation.write_text(
        json.dumps(_chat("q  ONE", "new answer"))
        + "\n"  # question shared
        + json.dumps(_chat("new question", "a two"))
        + "\n"  # answer shared
        + json.dumps(_chat("Fresh", "Fresh answer"))
        + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "x"}, *_chat("Q three", "A three")["messages"]]})
        + "\n"
    )
    train_facts = scan_split("train", train, data_config(), None)
    facts = scan_split("validation", validation, data_config(), None, TrainIndex.of(train_facts))

    assert flagged(facts, "train_overlap") == [1, 2, 4]
    assert facts.reasons["train_overlap"][1] == f"question 'q one' also in {train}:1"
    assert facts.reasons["train_overlap"][2] == f"answer 'a two' also in {train}:2"


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_streamed_chunks_give_the_same_facts_as_one_read(tiny_tokenizer, tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_bytes(b"\n" + (BAD / "train.jsonl").read_bytes() + b"\r\n  \n" + (BAD / "encoding.jsonl").read_bytes())
    whole = scan_split("train", source, data_config(), tiny_tokenizer)
    chunked = scan_split("train", source, data_config(chunk_mb=300 / 2**20), tiny_tokenizer)  # ~300-byte chunks

    assert len(chunked.columns["line"]) > 5
    for name in ("line", "required_fields", "empty_content", "roles", "encoding", "over_length", "key", "exact_key"):
        assert chunked.column(name).tolist() == whole.column(name).tolist(), name
    assert chunked.reasons == whole.reasons


def test_token_lengths_match_tokenisation(tiny_tokenizer, tmp_path):
    from loraops.data.reader import load_split
    from loraops.data.tokenization import token_lengths

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"number {index} " * (index + 1)}) + "\n" for index in range(5)))
    for path in (GOOD / "train.jsonl", text):
        facts = scan_split("train", path, data_config(), tiny_tokenizer)
        expected = token_lengths(tiny_tokenizer, load_split(path).examples)
        assert facts.column("token_length").astype(int).tolist() == expected


def test_contract_settings_are_validated():
    from loraops.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.contract.quarantine lists \\['duplicates'\\] more than once"):
        config_from_dict({"data": {"contract": {"quarantine": ["duplicates", "duplicates"]}}})
    with pytest.raises(ConfigError, match="data.contract.quarantine.0"):
        config_from_dict({"data": {"contract": {"quarantine": ["dupes"]}}})
    with pytest.raises(ConfigError, match="data.contract.over_length.max_share"):
        config_from_dict({"data": {"contract": {"over_length": {"max_share": 1.0}}}})
    with pytest.raises(ConfigError, match="data.contract.emails.severity"):
        config_from_dict({"data": {"contract": {"emails": {"severity": "loud"}}}})


# --- the validate command ------------------------------------------------------------------


def test_validate_command_prints_the_summary_and_exits_0_or_1(tiny_model_dir, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from loraops.cli.app import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"base": str(tiny_model_dir)}, "data": {"max_length": MAX_LENGTH}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = CliRunner()

    good = runner.invoke(app, ["validate", str(GOOD), "--params", str(params)])
    bad = runner.invoke(app, ["validate", str(BAD / "train.jsonl"), "--validation", str(BAD / "validation.jsonl")])
    alone = runner.invoke(app, ["validate", str(BAD / "train.jsonl")])

    assert good.exit_code == 0, good.output
    assert good.output.startswith("Data contract PASSED") and "Data Docs:" in good.output
    assert bad.exit_code == 1 and "FAIL train      roles" in bad.output and "PASS train      tokenizes" in bad.output
    assert alone.exit_code == 1 and "FAIL train      roles" in alone.output
    assert "SKIP validation train_overlap" in alone.output and "FAIL validation" not in alone.output
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()


# --- malformed rows: a failure naming file and line, never a traceback -----------------------

_GOOD_ROW = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
_ANSWER = '{"role": "assistant", "content": "x"}'
MALFORMED_ROWS = {
    "non_dict_message": '{"messages": ["hi", ' + _ANSWER + "]}",
    "null_message": '{"messages": [null, ' + _ANSWER + "]}",
    "content_number": '{"messages": [{"role": "user", "content": 5}, ' + _ANSWER + "]}",
    "content_object": '{"messages": [{"role": "user", "content": {"a": [1]}}, ' + _ANSWER + "]}",
    "content_bool": '{"messages": [{"role": "user", "content": true}, ' + _ANSWER + "]}",
    "content_nan": '{"messages": [{"role": "user", "content": NaN}, ' + _ANSWER + "]}",
    "content_missing": '{"messages": [{"role": "user"}, ' + _ANSWER + "]}",
    "role_null": '{"messages": [{"role": null, "content": "a"}, ' + _ANSWER + "]}",
    "role_missing": '{"messages": [{"content": "a"}, ' + _ANSWER + "]}",
    "messages_object": '{"messages": {"role": "user", "content": "a"}}',
    "messages_string": '{"messages": "hello"}',
    "messages_null": '{"messages": null}',
    "messages_empty": '{"messages": []}',
    "top_level_number": "5",
    "top_level_string": '"hi"',
    "top_level_list": "[1, 2]",
    "top_level_null": "null",
    "huge_int": '{"messages": [{"role": "user", "content": ' + "9" * 5000 + "}]}",
    "deeply_nested": '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "lone_surrogate_role": '{"messages": [{"role": "\\ud800", "content": "a"}, ' + _ANSWER + "]}",
    "truncated": '{"messages": [',
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("row", list(MALFORMED_ROWS.values()), ids=list(MALFORMED_ROWS))
def test_a_malformed_row_fails_naming_file_and_line(row, suffix, tiny_tokenizer, tmp_path):
    train = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        train.write_text(f"{_GOOD_ROW}\n{row}\n{_GOOD_ROW}\n")
        line = 2
    else:
        train.write_text(f"[\n{_GOOD_ROW},\n{row},\n{_GOOD_ROW}\n]\n")
        line = 3
    validation = GOOD / "validation.jsonl"
    try:  # the function `loraops validate` runs: a refused file or a failed contract, nothing else
        report = validate_dataset(train, validation, tiny_tokenizer, data_config(), tmp_path / "reports")
    except DataError as error:
        message = str(error)
    else:
        assert not report.passed
        message = format_report(report, failures_only=True)
    assert f"{train}:{line}" in message, message
    assert "Traceback" not in message
