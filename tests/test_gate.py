"""The gate's decision table: every row states the losses, the margins and what must happen."""

from __future__ import annotations

import math

import pytest

from loraops.config import GateConfig
from loraops.gate import gate_candidate
from loraops.results import EvalMetrics


def metrics(loss: float, tokens: int = 1000, examples: int = 50) -> EvalMetrics:
    return EvalMetrics(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens, examples=examples)


CASES = [
    # id, baseline, candidate, champion loss, champion version, base margin, champion margin, passes, phrase
    ("pass-vs-base-and-champion", 2.802, 2.013, 2.2, "3", 0.01, 0.0, True, "improved by 0.789 ≥ required 0.010"),
    ("fail-vs-base-worse", 2.0, 2.1, None, None, 0.01, 0.0, False, "worse by 0.100"),
    ("fail-vs-base-below-margin", 2.8, 2.795, None, None, 0.01, 0.0, False, "improved by 0.005 < required 0.010"),
    ("fail-vs-champion", 2.8, 2.1, 2.0, "4", 0.01, 0.0, False, "vs champion v4 2.000: worse by 0.100"),
    ("fail-vs-champion-margin", 2.8, 2.1, 2.15, "4", 0.01, 0.1, False, "improved by 0.050 < required 0.100"),
    ("equal-to-base-margin-zero", 2.5, 2.5, None, None, 0.0, 0.0, False, "no improvement"),
    ("equal-to-champion-margin-zero", 2.8, 2.1, 2.1, "2", 0.01, 0.0, False, "vs champion v2 2.100: no improvement"),
    ("margin-boundary-passes", 2.81, 2.80, None, None, 0.01, 0.0, True, "improved by 0.010 ≥ required 0.010"),
    ("tiny-gain-margin-zero", 2.5, 2.4999, None, None, 0.0, 0.0, True, "improved by 1.0e-04 ≥ required 0.000"),
    ("no-champion", 2.8, 2.0, None, None, 0.01, 0.0, True, "no champion registered yet"),
    ("champion-without-loss", 2.8, 2.0, None, "5", 0.01, 0.0, True, "champion v5 has no recorded validation loss"),
    ("nan-candidate", 2.8, math.nan, None, None, 0.01, 0.0, False, "candidate validation loss is nan"),
    ("inf-candidate", 2.8, math.inf, 2.5, "1", 0.01, 0.0, False, "candidate validation loss is inf"),
]


@pytest.mark.parametrize(
    ("baseline", "candidate", "champion_loss", "champion_version", "base_margin", "champ_margin", "passes", "phrase"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_gate_decision_table(
    baseline, candidate, champion_loss, champion_version, base_margin, champ_margin, passes, phrase
):
    cfg = GateConfig(min_improvement_over_base=base_margin, min_improvement_over_champion=champ_margin)

    decision = gate_candidate(metrics(baseline), metrics(candidate), champion_loss, champion_version, cfg)

    assert decision.passed is passes
    assert any(phrase in reason for reason in decision.reasons), decision.reasons
    assert decision.champion_loss == champion_loss
    assert decision.champion_version == champion_version


def test_reasons_explain_both_comparisons_with_numbers():
    decision = gate_candidate(metrics(2.802), metrics(2.013), 2.2, "3", GateConfig())

    assert decision.reasons == [
        "validation loss 2.013 vs base 2.802: improved by 0.789 ≥ required 0.010",
        "validation loss 2.013 vs champion v3 2.200: improved by 0.187 ≥ required 0.000",
    ]
    assert (decision.baseline_loss, decision.candidate_loss) == (2.802, 2.013)


@pytest.mark.parametrize(
    ("baseline", "candidate"),
    [(metrics(2.8, tokens=1000), metrics(2.0, tokens=990)), (metrics(2.8, examples=50), metrics(2.0, examples=49))],
    ids=["tokens-differ", "examples-differ"],
)
def test_different_evaluation_data_is_not_comparable(baseline, candidate):
    decision = gate_candidate(baseline, candidate, None, None, GateConfig())

    assert not decision.passed
    assert "different data" in decision.reasons[0]
    assert f"{baseline.tokens} tokens" in decision.reasons[0]
    assert f"{candidate.tokens} tokens" in decision.reasons[0]


def test_decision_round_trips_through_json(tmp_path):
    decision = gate_candidate(metrics(2.8), metrics(2.0), 2.1, "1", GateConfig())

    path = decision.write_json(tmp_path / "gate.json")

    assert type(decision).read_json(path) == decision
