"""The serving benchmark (bench/serve_bench.py): its arguments, statistics, table, and a smoke run on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_bench.py"


def _load_bench():
    if "serve_bench" in sys.modules:
        return sys.modules["serve_bench"]
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_bench"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_arguments_smoke_mode_and_bad_counts():
    bench = _load_bench()
    args = bench.parse_args(["--device", "cuda", "--requests", "3", "--max-tokens", "8"])
    assert (args.device, args.rounds, args.requests, args.max_tokens, args.concurrency) == ("cuda", 3, 3, 8, 4)
    smoke = bench.parse_args(["--smoke", "--requests", "9"])
    assert (smoke.rounds, smoke.requests, smoke.max_tokens, smoke.concurrency) == (1, 1, 4, 2)
    for bad in (["--requests", "0"], ["--rounds", "0"], ["--device", "tpu"], ["--concurrency", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_percentiles_match_numpy_and_the_table_reports_each_scenario():
    bench = _load_bench()
    values = [0.9, 0.1, 0.5, 2.0, 0.3, 0.7, 1.1]
    for q in (0, 50, 95, 100):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert bench.percentile([], 50) is None
    row = bench.Row("one adapter", latencies_s=[1.0, 3.0], tokens=[10, 20], wall_s=5.0)
    summary = row.summary()
    assert summary["tokens_per_s"] == pytest.approx(6.0) and summary["p50_s"] == pytest.approx(2.0)
    assert summary["ttft_p50_s"] is None
    no_usage = bench.Row("streamed", latencies_s=[1.0], first_token_s=[0.25], wall_s=1.0).summary()
    assert no_usage["tokens_per_s"] is None and no_usage["ttft_p50_s"] == pytest.approx(0.25)
    meta = {"base": "b", "device": "cpu", "cpus": 2, "max_tokens": 4, "max_adapters": 4, "rounds": 1}
    table = bench.markdown_table([row], {**meta, "load_start": 1.0, "load_end": 2.0})
    assert summary["request_tokens_per_s_p50"] == pytest.approx(np.median([10 / 1.0, 20 / 3.0]))
    assert "| one adapter | 2 | 2.00 | 2.90 | 15.0 | 6.0 | 8.3 | – | – |" in table.splitlines()


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_run_serves_every_scenario_with_the_tiny_model(tmp_path, tiny_model_dir):
    """~1 min on 2 cores: registry with two adapters, a real `loraops serve`, every scenario through the openai client."""
    bench = _load_bench()
    out = tmp_path / "serve.json"
    argv = ["--smoke", "--base", str(tiny_model_dir), "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {row["scenario"].split(" (")[0]: row for row in result["rows"]}
    assert len(rows) == 6
    assert rows["first request to each model"]["requests"] == 3
    for name, row in rows.items():
        assert row["requests"] >= 1 and all(0 < s for s in row["latencies_s"]), name
        assert row["tokens"] and all(1 <= t <= 4 for t in row["tokens"]), name  # max_tokens 4 in smoke mode
    streamed = rows["streamed, one adapter"]
    # a first-token time exactly for an answer with text (the tiny model's 4 tokens may decode to whitespace only)
    assert len(streamed["first_token_s"]) == sum(chars > 0 for chars in streamed["streamed_chars"]) <= 1
    assert all(0 < first <= streamed["latencies_s"][0] for first in streamed["first_token_s"])
    assert rows["2 concurrent clients, adapters alternating"]["requests"] == 2
    assert result["meta"]["max_adapters"] >= 2
