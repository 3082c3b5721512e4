"""The gate's decision table: every row states the losses, the margins and what must happen."""

from __future__ import annotations

import math

import pytest

from loraops.config import GateConfig
from loraops.evaluate.bootstrap import Interval
from loraops.evaluate.gate import GateEvidence, gate_candidate
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
        "validation loss 2.013 vs base 2.802: improved by 0.789 ≥ required 0.010 (no per-example losses: interval not computed)",
        "validation loss 2.013 vs champion v3 2.200: improved by 0.187 ≥ required 0.000 (no per-example losses: interval not computed)",
        "general-text loss not measured (eval.general_examples is 0): forgetting not checked",
        "answers not scored (eval.generate is off)",
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


def test_reasons_list_every_check_with_its_numbers():
    evidence = GateEvidence(
        over_base=Interval(estimate=0.5, low=0.3, high=0.7, confidence=0.95),
        over_champion=Interval(estimate=0.1, low=-0.02, high=0.2, confidence=0.95),
        general_base_loss=3.0,
        general_candidate_loss=3.06,
        rouge_l_base=0.2,
        rouge_l_candidate=0.35,
        exact_match_base=0.0,
        exact_match_candidate=0.25,
    )
    decision = gate_candidate(metrics(2.5), metrics(2.0), 2.1, "3", GateConfig(min_rouge_l_improvement=0.1), evidence)

    assert decision.passed
    assert decision.reasons == [
        "validation loss 2.000 vs base 2.500: improved by 0.500 ≥ required 0.010; improvement 95% CI [0.300, 0.700]",
        "validation loss 2.000 vs champion v3 2.100: improved by 0.100 ≥ required 0.000; improvement 95% CI [-0.020, 0.200]",
        "general-text loss 3.060 vs base 3.000 (+2.0%): within the allowed 5.0% rise",
        "ROUGE-L 0.350 vs base 0.200, exact match 0.250 vs 0.000: ROUGE-L gain +0.150 ≥ required 0.100",
    ]
    numbers = decision.metrics()
    assert numbers["improvement_over_champion_low"] == -0.02 and numbers["general_candidate_loss"] == 3.06
    assert all(isinstance(value, int | float) for value in numbers.values())


def test_forgetting_fails_an_adapter_whose_task_loss_improved():
    evidence = GateEvidence(general_base_loss=3.0, general_candidate_loss=3.3)
    decision = gate_candidate(metrics(2.5), metrics(2.0), None, None, GateConfig(), evidence)

    assert not decision.passed
    assert decision.reasons[0].startswith("validation loss 2.000 vs base 2.500: improved by 0.500")
    assert "general-text loss 3.300 vs base 3.000 (+10.0%): rises more than the allowed 5.0%" in decision.reasons[2]
    assert "forgot" in decision.reasons[2]


def test_required_interval_fails_a_gain_that_may_be_noise():
    noisy = GateEvidence(over_base=Interval(estimate=0.05, low=-0.01, high=0.11, confidence=0.9))
    strict = GateConfig(require_confident_improvement=True)

    assert gate_candidate(metrics(2.5), metrics(2.45), None, None, GateConfig(), noisy).passed
    decision = gate_candidate(metrics(2.5), metrics(2.45), None, None, strict, noisy)
    assert not decision.passed
    assert "90% CI [-0.010, 0.110]: lower bound -0.010 does not clear the margin 0.010" in decision.reasons[0]
    assert not gate_candidate(metrics(2.5), metrics(2.45), None, None, strict, GateEvidence()).passed


def test_rouge_rule_fails_without_enough_gain_or_without_scores():
    cfg = GateConfig(min_rouge_l_improvement=0.05)
    small = GateEvidence(rouge_l_base=0.30, rouge_l_candidate=0.32)
    decision = gate_candidate(metrics(2.5), metrics(2.0), None, None, cfg, small)
    assert not decision.passed and "ROUGE-L gain +0.020 < required 0.050" in decision.reasons[-1]
    unscored = gate_candidate(metrics(2.5), metrics(2.0), None, None, cfg, GateEvidence())
    assert not unscored.passed and "gate.min_rouge_l_improvement requires it" in unscored.reasons[-1]


def test_score_table_sets_base_and_adapter_side_by_side():
    from loraops.cli.reporting import evaluation_markdown
    from loraops.evaluate.score_table import score_table

    evidence = GateEvidence(
        over_base=Interval(estimate=0.5, low=0.3, high=0.7, confidence=0.95),
        general_base_loss=3.0,
        general_candidate_loss=3.06,
        rouge_l_base=0.2,
        rouge_l_candidate=0.35,
        exact_match_base=0.0,
        exact_match_candidate=0.25,
    )
    decision = gate_candidate(metrics(2.5), metrics(2.0), None, None, GateConfig(), evidence)

    rows = score_table(decision)
    assert "| general-text loss (forgetting) | 3.0000 | 3.0600 |" in rows
    assert "| ROUGE-L F1 of greedy answers | 0.200 | 0.350 |" in rows
    assert "| exact match of greedy answers | 0.000 | 0.250 |" in rows
    assert "\nLoss improvement over base: bootstrap interval [0.3000, 0.7000]" in rows
    artifact = evaluation_markdown(metrics(2.5), metrics(2.0), decision)
    assert all(f"- {reason}" in artifact for reason in decision.reasons)
