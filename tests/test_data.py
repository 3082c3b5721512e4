"""Loading user datasets and importing the embedded chatterbot corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from loraops.config import ImportConfig
from loraops.data.chatterbot import import_chatterbot, split_without_overlap
from loraops.data.formats import DataError
from loraops.data.keys import normalize_text, overlap_keys
from loraops.data.reader import load_split

BAD = Path(__file__).parent / "fixtures" / "bad"

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
ALPACA_ROWS = [
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"instruction": "Say hello", "input": "", "output": "Hello"},
]
TEXT_ROWS = [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}]

EXPECTED = {
    "chat": [CHAT_ROWS[0], CHAT_ROWS[1]],
    "alpaca": [
        {
            "messages": [
                {"role": "user", "content": "Translate to French\n\ncat"},
                {"role": "assistant", "content": "chat"},
            ]
        },
        {"messages": [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello"}]},
    ],
    "text": TEXT_ROWS,
}
ROWS = {"chat": CHAT_ROWS, "alpaca": ALPACA_ROWS, "text": TEXT_ROWS}


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows the way users produce each file type (CSV chat rows hold messages as JSON)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif suffix == ".csv":
        flat = [{key: json.dumps(value) if key == "messages" else value for key, value in row.items()} for row in rows]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


# --- load_split: formats and file types ----------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", ["chat", "alpaca", "text"])
def test_load_split_reads_every_format_and_file_type(tmp_path, fmt, suffix):
    path = write_rows(tmp_path / f"train{suffix}", ROWS[fmt])

    detected = load_split(path, "auto")
    explicit = load_split(path, fmt)

    assert detected.format == explicit.format == fmt
    assert detected.examples == EXPECTED[fmt]
    assert len(detected) == 2 and detected.path == str(path)


def test_jsonl_lines_count_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n" + json.dumps(TEXT_ROWS[0]) + "\n\n" + json.dumps(TEXT_ROWS[1]) + "\n")

    assert load_split(path).lines == [2, 4]


def test_json_rows_keep_the_line_they_start_on(tmp_path):
    path = write_rows(tmp_path / "train.json", TEXT_ROWS)  # indent=2: rows start on lines 2 and 5

    assert load_split(path).lines == [2, 5]


def test_csv_and_parquet_lines_are_data_row_numbers(tmp_path):
    assert load_split(write_rows(tmp_path / "a.csv", ALPACA_ROWS)).lines == [1, 2]
    assert load_split(write_rows(tmp_path / "a.parquet", ALPACA_ROWS)).lines == [1, 2]


def test_parquet_messages_as_json_strings_are_decoded(tmp_path):
    path = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [json.dumps(row["messages"]) for row in CHAT_ROWS]}).to_parquet(path)

    assert load_split(path).examples == CHAT_ROWS


def test_normalisation_keeps_content_problems_for_the_contract(tmp_path):
    rows = [
        {"messages": [{"role": "bot", "content": None}, {"role": "user", "content": ""}]},
        {"instruction": None, "output": "x"},
    ]
    chat = load_split(write_rows(tmp_path / "chat.jsonl", rows[:1]))
    alpaca = load_split(write_rows(tmp_path / "alpaca.jsonl", rows[1:]))

    assert chat.examples == [{"messages": rows[0]["messages"]}]
    assert alpaca.examples[0]["messages"][0] == {"role": "user", "content": None}


def test_empty_file_loads_without_rows(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("")

    split = load_split(path)

    assert (split.format, split.rows, split.examples) == ("empty", [], [])
    assert load_split(path, "alpaca").format == "alpaca"


# --- load_split: errors name file, line and field ------------------------------------------


def test_missing_file_says_which_setting_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: not found; set data\.train_file"):
        load_split(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"train\.txt: unknown file extension '\.txt'.*\.jsonl"):
        load_split(path)


def test_malformed_jsonl_names_the_line():
    with pytest.raises(DataError, match=r"bad/malformed\.jsonl:2: malformed JSON"):
        load_split(BAD / "malformed.jsonl")


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=r"train\.json:3: malformed JSON"):
        load_split(path)


def test_json_object_instead_of_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"train\.json:1: expected a JSON list.*\.jsonl"):
        load_split(path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n" + '["just", "a", "list"]\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected an object.*got list"):
        load_split(path)


def test_unknown_format_lists_found_and_needed_fields():
    with pytest.raises(DataError) as caught:
        load_split(BAD / "unknown.jsonl")
    message = str(caught.value)
    assert "unknown.jsonl:1: unknown data format" in message
    assert "['prompt', 'response']" in message
    assert "chat needs 'messages'" in message and "alpaca needs 'instruction' + 'output'" in message


def test_mixed_formats_name_the_disagreeing_lines():
    with pytest.raises(DataError) as caught:
        load_split(BAD / "mixed.jsonl")
    message = str(caught.value)
    assert "mixed.jsonl" in message and "format 'chat' (detected)" in message
    assert "line(s) 2, 4" in message and "['instruction', 'output']" in message


def test_explicit_format_that_does_not_match(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", CHAT_ROWS)
    with pytest.raises(DataError, match=r"format 'alpaca' \(set by data\.format\).*line\(s\) 1, 2.*data\.format: auto"):
        load_split(path, "alpaca")


def test_csv_messages_that_are_not_json(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('messages\n"[{""role"": ""user""}]"\nnot json\n')
    with pytest.raises(DataError, match=r"train\.csv:2: field 'messages' holds malformed JSON"):
        load_split(path)


# --- keys and the leakage-free split --------------------------------------------------------


def test_normalize_text_ignores_case_and_spacing():
    assert normalize_text("  Hello\n  THERE ") == normalize_text("hello there") == "hello there"
    assert normalize_text(None) == ""


def chat(question: str, *answers: str) -> dict:
    turns = [{"role": "user", "content": question}]
    for answer in answers:
        turns += [{"role": "assistant", "content": answer}]
    return {"messages": turns}


def test_split_keeps_rows_sharing_a_question_or_answer_together():
    # a-b share an answer, b-c share a question (case aside): one group of three.
    linked = [chat("q1", "same answer"), chat("q2", "SAME answer"), chat("Q2", "other")]
    loners = [chat(f"question {index}", f"answer {index}") for index in range(30)]
    rows = linked + loners

    for seed in range(10):
        train, validation = split_without_overlap(rows, 0.3, seed)
        assert len(train) + len(validation) == len(rows)
        assert len(validation) == 10
        group_in_train = [row in train for row in linked]
        assert all(group_in_train) or not any(group_in_train)
        train_keys = set().union(*(overlap_keys(row) for row in train))
        assert not any(overlap_keys(row) & train_keys for row in validation)


# --- import_chatterbot ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chatterbot(tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("chatterbot") / "data"
    return import_chatterbot(ImportConfig(output_dir=str(output))), output


def test_import_is_byte_for_byte_deterministic(chatterbot, tmp_path):
    _, first = chatterbot
    second = tmp_path / "again"
    import_chatterbot(ImportConfig(output_dir=str(second)))

    assert sorted(path.name for path in first.iterdir()) == ["train.jsonl", "validation.jsonl"]
    for name in ("train.jsonl", "validation.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_import_seed_changes_the_split(chatterbot, tmp_path):
    _, first = chatterbot
    import_chatterbot(ImportConfig(output_dir=str(tmp_path), seed=7))

    assert (first / "validation.jsonl").read_bytes() != (tmp_path / "validation.jsonl").read_bytes()


def test_import_counts_are_plausible(chatterbot):
    summary, output = chatterbot
    train, validation = load_split(output / "train.jsonl"), load_split(output / "validation.jsonl")

    assert summary["files"] == 21 and summary["conversations"] == 2026
    assert summary["train_rows"] == len(train) > 600
    assert summary["validation_rows"] == len(validation) > 80
    assert summary["train_rows"] + summary["validation_rows"] == summary["unique"] < 1000
    assert abs(len(validation) / summary["unique"] - 0.13) < 0.01
    assert any(len(example["messages"]) > 2 for example in train.examples)  # multi-turn kept


def test_import_rows_alternate_and_end_with_the_assistant(chatterbot):
    _, output = chatterbot
    for name in ("train.jsonl", "validation.jsonl"):
        for example in load_split(output / name, "chat").examples:
            roles = [message["role"] for message in example["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) >= 2
            assert all(isinstance(message["content"], str) and message["content"] for message in example["messages"])


def test_import_has_no_validation_question_or_answer_in_train(chatterbot):
    _, output = chatterbot
    train = load_split(output / "train.jsonl").examples
    validation = load_split(output / "validation.jsonl").examples
    train_questions = {normalize_text(example["messages"][0]["content"]) for example in train}
    train_answers = {
        normalize_text(message["content"]) for example in train for message in example["messages"]
        if message["role"] == "assistant"
    }  # fmt: skip

    for example in validation:
        assert normalize_text(example["messages"][0]["content"]) not in train_questions
        for message in example["messages"][1::2]:
            assert normalize_text(message["content"]) not in train_answers


def test_import_has_no_duplicates(chatterbot):
    _, output = chatterbot
    lines = [line for name in ("train.jsonl", "validation.jsonl") for line in (output / name).read_text().splitlines()]
    normalised = {normalize_text(line) for line in lines}

    assert len(normalised) == len(lines)


def test_jsonl_messages_string_is_left_for_the_contract(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": "not a list"}\n')

    assert load_split(path).examples == [{"messages": "not a list"}]


# --- read_batches: the contract's streaming reader ----------------------------------------


def batch_turns(path: Path, fmt: str = "auto", chunk_bytes: int = 64 << 20) -> tuple[list[list[dict]], list[int]]:
    from loraops.data.batches import read_batches

    batches = list(read_batches(path, fmt, chunk_bytes))
    return [turns for batch in batches for turns in batch.messages.to_pylist()], [
        int(line) for batch in batches for line in batch.lines
    ]


def as_turns(example: dict) -> list[dict]:
    if "text" in example:
        return [{"role": "text", "content": example["text"]}]
    return [{"role": message["role"], "content": message["content"]} for message in example["messages"]]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", ["chat", "alpaca", "text"])
def test_read_batches_matches_load_split(tmp_path, fmt, suffix):
    path = write_rows(tmp_path / f"train{suffix}", ROWS[fmt] * 3)

    turns, lines = batch_turns(path)
    split = load_split(path)

    assert turns == [as_turns(example) for example in split.examples]
    assert lines == split.lines


def test_read_batches_uses_pyarrow_for_clean_jsonl_and_rows_otherwise(tmp_path):
    from loraops.data.batches import read_batches

    clean = write_rows(tmp_path / "clean.jsonl", CHAT_ROWS)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(
        json.dumps(CHAT_ROWS[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": None}]}) + "\n"
    )

    (fast,) = read_batches(clean)
    (slow,) = read_batches(odd)

    assert fast.offsets is not None and not fast.problems and fast.format == "chat"
    assert slow.messages.to_pylist()[1] == [{"role": "user", "content": None}]  # left for the contract


def test_jsonl_line_numbers_and_offsets_survive_blank_lines_crlf_and_bom(tmp_path):
    from loraops.data.batches import read_batches

    body = [json.dumps(row).encode() for row in TEXT_ROWS * 2]
    data = b"\xef\xbb\xbf" + body[0] + b"\r\n\r\n   \n" + body[1] + b"\n\n" + body[2] + b"\n" + body[3]
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)

    for chunk_bytes in (64 << 20, 40):  # whole, and chunks smaller than a line
        batches = list(read_batches(path, "auto", chunk_bytes))
        lines = [int(line) for batch in batches for line in batch.lines]
        offsets = [int(offset) for batch in batches for offset in batch.offsets]
        assert lines == load_split(path).lines == [1, 4, 6, 7]
        assert [data[offset : offset + 9] for offset in offsets] == [b'{"text": '] * 4


def test_read_batches_streams_parquet_in_chunks(tmp_path):
    path = tmp_path / "train.parquet"
    rows = [{"instruction": f"Count to {index}", "input": "", "output": f"1 ... {index}"} for index in range(3000)]
    pd.DataFrame(rows).to_parquet(path, row_group_size=1000)

    from loraops.data.batches import read_batches

    batches = list(read_batches(path, "auto", chunk_bytes=20_000))
    assert len(batches) > 1 and sum(len(batch) for batch in batches) == 3000
    assert int(batches[1].lines[0]) == len(batches[0]) + 1


def test_a_later_chunk_in_another_format_names_its_lines(tmp_path):
    from loraops.data.batches import read_batches

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS * 3 + ALPACA_ROWS))

    with pytest.raises(DataError, match=r"format 'chat' \(detected\).*at line\(s\) 7;"):
        list(read_batches(path, "auto", chunk_bytes=100))


def test_invalid_utf8_loads_replaced_in_jsonl_and_is_named_in_json_and_csv(tmp_path):
    from loraops.data.batches import read_batches

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (batch,) = read_batches(jsonl)
    assert load_split(jsonl).examples[1] == {"text": "caf\ufffd"}
    assert batch.encoding == {
        1: "invalid UTF-8 byte 0xe9 at byte 13 of the line (file offset 28); re-save the file as UTF-8"
    }

    for name, content in (("train.json", b'[\n {"text": "caf\xe9"}\n]'), ("train.csv", b"text\nok\ncaf\xe9\n")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}:(2|3): invalid UTF-8 byte 0xe9 at byte \d+ of the line"):
            load_split(path)


def test_lone_surrogate_escape_is_an_encoding_problem(tmp_path):
    from loraops.data.batches import read_batches

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "bad \\ud800 escape"}\n')

    (batch,) = read_batches(path)

    assert batch.messages.to_pylist() == [[{"role": "text", "content": "bad ? escape"}]]
    assert batch.encoding[0].startswith("lone surrogate U+D800")


def test_without_lines_drops_quarantined_rows(tmp_path):
    split = load_split(write_rows(tmp_path / "train.jsonl", TEXT_ROWS * 2))

    kept = split.without_lines({2, 3})

    assert kept.lines == [1, 4] and kept.examples == [TEXT_ROWS[0], TEXT_ROWS[1]] and kept.path == split.path


def test_import_rebuilds_exactly_the_data_that_data_dvc_records(tmp_path):
    """A fresh clone has no data/: `loraops import-data` must rebuild the very bytes data.dvc hashes."""
    import subprocess
    import sys

    import yaml

    from loraops.config import ImportConfig

    repo = Path(__file__).resolve().parent.parent
    recorded = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    import_chatterbot(ImportConfig(output_dir=str(tmp_path / "data")))
    dvc = str(Path(sys.executable).parent / "dvc")
    for args in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "add", "-q", "data"]):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    assert yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"] == recorded
