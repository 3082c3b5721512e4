"""Training and the data contract see one file alike: the same rows at the same lines, with the same keys."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from loraops.config import DataConfig
from loraops.contract.scan import scan_split
from loraops.data.formats import field_problem
from loraops.data.keys import example_key, overlap_keys
from loraops.data.reader import load_split


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


ROWS = [
    chat(("user", "Hello  there"), ("assistant", "Hi!")),
    chat(("system", "Be brief."), ("user", "STRASSE?"), ("assistant", "Straße, café")),
    {"messages": "not a list"},  # a field problem: training keeps it, the contract flags it
    chat(("user", "hello there"), ("assistant", "hi!")),  # a normalised duplicate of the first row
    chat(("user", "Empty answer"), ("assistant", None)),
    chat(("user", " \tTabs\u00a0and  spaces "), ("assistant", "Number 1984")),
    chat(("user", "hello there"), ("assistant", "Hi!"), ("user", "Again?"), ("assistant", "hi!")),
]


def write_jsonl_with_noise(path: Path) -> Path:
    """A BOM, blank lines and CRLF line ends: line numbers and byte offsets must survive them."""
    body = [json.dumps(row, ensure_ascii=False).encode() for row in ROWS]
    path.write_bytes(b"\xef\xbb\xbf\n" + b"\r\n".join(body[:3]) + b"\n\n  \n" + b"\n".join(body[3:]) + b"\n")
    return path


def config(chunk_bytes: int) -> DataConfig:
    return DataConfig(max_length=100, contract={"chunk_mb": chunk_bytes / 2**20})


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 120])  # whole, and chunks of about a line
def test_contract_and_training_read_the_same_rows_at_the_same_lines(tmp_path, chunk_bytes):
    path = write_jsonl_with_noise(tmp_path / "train.jsonl")

    split = load_split(path)
    facts = scan_split("train", path, config(chunk_bytes), None)

    assert split.lines == [2, 3, 4, 7, 8, 9, 10]
    assert facts.column("line").tolist() == split.lines
    problems = [field_problem(row, split.format) is not None for row in split.rows]
    assert (~facts.column("well_formed")).tolist() == problems == [False, False, True, False, False, False, False]


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_tables_and_json_arrays_number_rows_alike(tmp_path, suffix):
    rows = [row for row in ROWS if isinstance(row["messages"], list)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        frame = pd.DataFrame({"messages": [json.dumps(row["messages"]) for row in rows]})
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)

    split = load_split(path)
    facts = scan_split("train", path, config(32 << 20), None)

    assert facts.column("line").tolist() == split.lines and len(split.lines) == len(rows)


def test_contract_keys_are_the_keys_training_splits_by(tmp_path):
    path = write_jsonl_with_noise(tmp_path / "train.jsonl")
    split = load_split(path)
    facts = scan_split("train", path, config(32 << 20), None)

    well_formed = facts.column("well_formed")
    keys, key_lines = facts.column("train_keys").astype("uint64"), facts.column("train_key_lines")
    for row, (line, example) in enumerate(zip(split.lines, split.examples)):
        if not well_formed[row]:
            continue
        assert int(facts.column("key")[row]) == example_key(example), line
        assert {int(key) for key in keys[key_lines == line]} == overlap_keys(example), line
    assert example_key(split.examples[0]) == example_key(split.examples[3])  # case and spacing are normalised
    assert overlap_keys(split.examples[0]) & overlap_keys(split.examples[6])  # they share the question


def test_text_keys_from_arrow_buffers_match_the_python_path_and_ascii_lowering():
    """The one-read exact and lowered keys equal ``digests`` of the texts and of their ``ascii_lower``."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    from loraops.data.keys import digests, hash_strings, hash_strings_and_lowered

    rnd = random.Random(0)
    alphabet = "aAzZ@[`{ \x00\x7f" + "Hello Wörld ÜNÏCÖDÉ"  # the bytes around A-Z, and multi-byte UTF-8
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40))) for _ in range(3000)] + [None, ""]
    array = pa.array(texts).slice(1)  # an Arrow offset too
    exact, lowered = hash_strings_and_lowered(array)

    assert exact.tolist() == digests(texts[1:]).tolist() == hash_strings(array).tolist()
    assert lowered.tolist() == hash_strings(pc.ascii_lower(array)).tolist()
    assert exact[-2] == 0 and exact[-1] != 0  # null vs empty text
    distinct = {text for text in texts[1:] if text is not None}
    assert len(set(exact.tolist())) == len(distinct) + 1
