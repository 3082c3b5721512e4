"""The training benchmark: its CPU smoke mode end to end, and the padding arithmetic it reports."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from loraops.train.packing import best_fit_bins, padded_slots, padding_report

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_bench.py"


def _load_bench():
    if "train_bench" in sys.modules:
        return sys.modules["train_bench"]
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_bench"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_padding_shares_of_a_hand_made_dataset():
    lengths = [1, 2, 3, 4]
    # in order, batches of 2: [1, 2] -> 2 x 2 slots, [3, 4] -> 2 x 4 slots: 12 slots for 10 tokens
    assert padded_slots(lengths, 2) == 12
    assert best_fit_bins(lengths, capacity=5) == 2  # [4, 1] and [3, 2]
    assert best_fit_bins(lengths, capacity=4) == 3  # [4], [3, 1], [2]
    report = padding_report(lengths, batch_size=2, capacity=4, seed=None)
    assert report.tokens == 10
    assert report.padded_share == pytest.approx(2 / 12)
    assert report.padding_free_share == 0.0
    assert report.packed_share == pytest.approx(2 / 12)
    assert padding_report(lengths, batch_size=2, capacity=5, seed=None).packed_share == 0.0
    # one example per batch never pads; a shuffle changes which examples share a batch, never the tokens
    assert padding_report(lengths, batch_size=1, capacity=4).padded_share == 0.0
    assert padding_report(lengths, batch_size=2, capacity=4, seed=1).tokens == 10


def test_four_n_limit_of_the_8b_shape_is_the_issues_26k():
    bench = _load_bench()
    from dataclasses import asdict

    assert bench.four_n_limit(asdict(bench.SCALES["gpu"])) == pytest.approx(26_000, rel=0.02)


def test_write_benchmarks_replaces_only_the_marked_section(tmp_path):
    bench = _load_bench()
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# B\n\nbefore\n{bench.BEGIN_MARK}\nold table\n{bench.END_MARK}\nafter\n")
    bench.write_benchmarks("| new |\n", page)
    assert page.read_text() == f"# B\n\nbefore\n{bench.BEGIN_MARK}\n| new |\n{bench.END_MARK}\nafter\n"


def test_smoke_run_trains_seed_and_loraops_side_by_side(tmp_path):
    """~30 s on 2 cores: five configurations on a tiny random Llama, QLoRA through bitsandbytes' CPU backend."""
    bench = _load_bench()
    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    assert bench.main(["--mode", "smoke", "--out", str(out), "--markdown", str(markdown)]) == 0

    result = json.loads(out.read_text())
    scale = bench.SCALES["smoke"]
    steps = scale.warmup_steps + scale.steps
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == [config.name for config in bench.CONFIGS]
    pool = bench.synthetic_lengths(steps * max(c.batch_size for c in bench.CONFIGS), scale)
    assert len(set(pool)) > 10 and max(pool) > 2 * scale.median_length  # a real mix of lengths
    for name, row in rows.items():
        assert row["status"] == "ok", name
        # every token of the config's one epoch reached the model, and nothing else did
        assert row["dataset_tokens"] == sum(pool[: steps * row["batch_size"]])
        assert row["real_tokens_all_steps"] == row["dataset_tokens"], name
        assert row["tokens_check"] is True
        assert row["tokens_per_s"] > 0 and row["seconds_timed"] > 0
        assert row["real_tokens_timed"] < row["real_tokens_all_steps"]  # the warm-up is not timed
        assert len(row["losses"]) == steps
        assert all(math.isfinite(loss) for loss in row["losses"]), name
        assert row["peak_memory_gib"] is None and row["peak_rss_mib"] > 0  # CPU: RSS, no GPU figure
        assert row["trainable_params"] > 0
    assert rows["seed-qlora"]["upcast_non_quantized"] and not rows["loraops-qlora"]["upcast_non_quantized"]
    assert {row["attn_implementation"] for row in rows.values()} == {"sdpa"} and not rows["loraops-lora"][
        "torch_compile"
    ]
    for name in ("loraops-qlora", "loraops-lora"):
        assert rows[name]["padding_share"] == 0.0
        assert rows[name]["slots_all_steps"] == rows[name]["real_tokens_all_steps"]
    for name in ("seed-qlora", "seed-lora", "seed-lora-ckpt"):
        assert rows[name]["padding_share"] > 0.05, name
    assert rows["seed-lora"]["losses"] == pytest.approx(
        rows["seed-lora-ckpt"]["losses"], rel=1e-4
    )  # checkpointing changes speed, not maths
    assert result["ratios"]["qlora_speedup"] > 0
    assert "qlora_memory_ratio" not in result["ratios"]  # a memory goal is a GPU figure
    assert result["machine"]["versions"]["trl"] and result["machine"]["cpu_count"] >= 1

    table = markdown.read_text()
    assert "CPU smoke run" in table and "not a performance claim" in table
    for config in bench.CONFIGS:
        assert f"| {config.label} | {config.batch_size} |" in table


def test_attention_and_compile_flags_reach_only_the_loraops_rows(tmp_path):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    argv = [
        "--mode",
        "smoke",
        "--steps",
        "1",
        "--configs",
        "loraops-lora",
        "seed-lora",
        "--attn",
        "eager",
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["loraops-lora"]["attn_implementation"] == "eager" and rows["seed-lora"]["attn_implementation"] == "sdpa"
    assert all(row["status"] == "ok" and row["tokens_check"] for row in rows.values())


def test_checkpoint_every_n_layers_reaches_only_the_loraops_rows_that_checkpoint(tmp_path):
    bench = _load_bench()
    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = [
        "--mode",
        "smoke",
        "--steps",
        "1",
        "--configs",
        "loraops-qlora",
        "loraops-lora",
        "seed-lora-ckpt",
        "--checkpoint-every-n-layers",
        "2",
        "--out",
        str(out),
        "--markdown",
        str(markdown),
    ]
    assert bench.main(argv) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert all(row["status"] == "ok" and row["tokens_check"] for row in rows.values())
    # the smoke model has 2 decoder layers: every 2nd checkpoints layer 0 only
    assert {name: row["checkpointed_layers"] for name, row in rows.items()} == {
        "loraops-qlora": 1,
        "loraops-lora": 0,
        "seed-lora-ckpt": 2,
    }
    assert "| loraops QLoRA NF4 | 16 | 1/2 |" in markdown.read_text()
