"""Quality gate: register a candidate adapter only if it beats the base model (and the champion).

An improvement must be strictly positive *and* at least the configured margin, so a margin of 0
still rejects a candidate that merely ties. Losses are only comparable when they were measured
over the same target tokens; a mismatch means different data and fails the gate outright.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from loraops.config import GateConfig
from loraops.evaluate.bootstrap import Interval
from loraops.results import EvalMetrics, GateDecision

logger = logging.getLogger(__name__)

# Float subtraction can land a hair below a margin the user typed exactly (2.81 - 2.80 < 0.01).
_MARGIN_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateEvidence:
    """What the gate weighs besides the two losses; a missing piece is reported, not assumed."""

    over_base: Interval | None = None  # bootstrap interval of base loss - candidate loss
    over_champion: Interval | None = None
    general_base_loss: float | None = None  # forgetting: loss on the general-text set
    general_candidate_loss: float | None = None
    rouge_l_base: float | None = None  # mean ROUGE-L F1 of greedy answers vs references
    rouge_l_candidate: float | None = None
    exact_match_base: float | None = None
    exact_match_candidate: float | None = None

    def numbers(self) -> dict[str, float]:
        values = {
            f"{key}_{end}": getattr(interval, end)
            for key, interval in (
                ("improvement_over_base", self.over_base),
                ("improvement_over_champion", self.over_champion),
            )
            if interval is not None
            for end in ("low", "high")
        }
        for key in (
            "general_base_loss",
            "general_candidate_loss",
            "rouge_l_base",
            "rouge_l_candidate",
            "exact_match_base",
            "exact_match_candidate",
        ):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return values


def gate_candidate(
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    champion_loss: float | None,
    champion_version: str | None,
    cfg: GateConfig,
    evidence: GateEvidence | None = None,
) -> GateDecision:
    """Compare validation losses; ``reasons`` explains every comparison with its numbers.

    ``champion_loss`` must have been measured on the same validation data as ``candidate``.
    A champion without a recorded loss cannot be compared: the reasons say so and the gate
    decides on the base comparison alone.
    """
    evidence = evidence or GateEvidence()
    problem = _comparability_problem(baseline, candidate)
    if problem:
        passed, reasons = False, [problem]
    else:
        passed, reasons = _compare_losses(baseline, candidate, champion_loss, champion_version, cfg, evidence)
        for check in (_check_forgetting, _check_answers):
            ok, reason = check(evidence, cfg)
            passed = passed and ok
            reasons.append(reason)
    decision = GateDecision(
        evidence=evidence.numbers(),
        passed=passed,
        reasons=reasons,
        baseline_loss=baseline.loss,
        candidate_loss=candidate.loss,
        champion_loss=champion_loss,
        champion_version=champion_version,
    )
    logger.info("gate %s: %s", "passed" if passed else "failed", "; ".join(reasons))
    return decision


def _comparability_problem(baseline: EvalMetrics, candidate: EvalMetrics) -> str | None:
    for label, metrics in (("candidate", candidate), ("baseline", baseline)):
        if not math.isfinite(metrics.loss):
            return f"{label} validation loss is {metrics.loss}: evaluation diverged or failed, nothing to compare"
    if (baseline.tokens, baseline.examples) != (candidate.tokens, candidate.examples):
        return (
            f"baseline was measured over {baseline.tokens} tokens / {baseline.examples} examples but the "
            f"candidate over {candidate.tokens} tokens / {candidate.examples} examples: different data, so "
            f"losses {_fmt(baseline.loss)} and {_fmt(candidate.loss)} are not comparable"
        )
    return None


def _compare_losses(
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    champion_loss: float | None,
    champion_version: str | None,
    cfg: GateConfig,
    evidence: GateEvidence,
) -> tuple[bool, list[str]]:
    passed, reason = _check_improvement(candidate.loss, baseline.loss, "base", cfg.min_improvement_over_base)
    passed, reason = _with_interval(passed, reason, evidence.over_base, cfg.min_improvement_over_base, cfg)
    reasons = [reason]
    champion = f"champion v{champion_version}" if champion_version else "champion"
    if champion_loss is not None:
        beats_champion, reason = _check_improvement(
            candidate.loss, champion_loss, champion, cfg.min_improvement_over_champion
        )
        beats_champion, reason = _with_interval(
            beats_champion, reason, evidence.over_champion, cfg.min_improvement_over_champion, cfg
        )
        passed = passed and beats_champion
        reasons.append(reason)
    elif champion_version is not None:
        reasons.append(f"{champion} has no recorded validation loss: compared against the base model only")
    else:
        reasons.append("no champion registered yet: compared against the base model only")
    return passed, reasons


def _check_improvement(candidate: float, reference: float, name: str, margin: float) -> tuple[bool, str]:
    improvement = reference - candidate
    head = f"validation loss {_fmt(candidate)} vs {name} {_fmt(reference)}"
    if improvement <= 0:
        change = "no improvement" if improvement == 0 else f"worse by {_fmt(-improvement)}"
        return False, f"{head}: {change}, an improvement > 0 and ≥ {_fmt(margin)} is required"
    if improvement + _MARGIN_TOLERANCE >= margin:
        return True, f"{head}: improved by {_fmt(improvement)} ≥ required {_fmt(margin)}"
    return False, f"{head}: improved by {_fmt(improvement)} < required {_fmt(margin)}"


def _with_interval(
    passed: bool, reason: str, interval: Interval | None, margin: float, cfg: GateConfig
) -> tuple[bool, str]:
    """State the bootstrap interval; with require_confident_improvement its lower bound must clear the margin."""
    if interval is None:
        if cfg.require_confident_improvement:
            return (
                False,
                f"{reason}; no per-example losses, so no interval: gate.require_confident_improvement cannot be met",
            )
        return passed, f"{reason} (no per-example losses: interval not computed)"
    stated = f"{reason}; improvement {interval.describe()}"
    if not cfg.require_confident_improvement:
        return passed, stated
    if interval.low + _MARGIN_TOLERANCE >= margin and interval.low > 0:
        return passed, f"{stated}, lower bound ≥ {_fmt(margin)}"
    return (
        False,
        f"{stated}: lower bound {_fmt(interval.low)} does not clear the margin {_fmt(margin)}, the gain may be noise",
    )


def _check_forgetting(evidence: GateEvidence, cfg: GateConfig) -> tuple[bool, str]:
    base, adapter = evidence.general_base_loss, evidence.general_candidate_loss
    if base is None or adapter is None:
        return True, "general-text loss not measured (eval.general_examples is 0): forgetting not checked"
    if not math.isfinite(adapter):
        return False, f"general-text loss of the adapter is {adapter}: forgetting check failed"
    rise = (adapter - base) / base
    head = f"general-text loss {_fmt(adapter)} vs base {_fmt(base)} ({rise:+.1%})"
    limit = cfg.max_general_loss_increase
    if limit is None:
        return True, f"{head}: report only (gate.max_general_loss_increase is empty)"
    if rise > limit:
        return (
            False,
            f"{head}: rises more than the allowed {limit:.1%}: the adapter forgot general ability (catastrophic forgetting), whatever its task loss",
        )
    return True, f"{head}: within the allowed {limit:.1%} rise"


def _check_answers(evidence: GateEvidence, cfg: GateConfig) -> tuple[bool, str]:
    base, adapter = evidence.rouge_l_base, evidence.rouge_l_candidate
    required = cfg.min_rouge_l_improvement
    if base is None or adapter is None:
        if required is not None:
            return False, "answers were not scored (eval.generate is off), but gate.min_rouge_l_improvement requires it"
        return True, "answers not scored (eval.generate is off)"
    head = f"ROUGE-L {adapter:.3f} vs base {base:.3f}"
    if evidence.exact_match_base is not None and evidence.exact_match_candidate is not None:
        head += f", exact match {evidence.exact_match_candidate:.3f} vs {evidence.exact_match_base:.3f}"
    if required is None:
        return True, f"{head}: report only (gate.min_rouge_l_improvement is empty)"
    gain = adapter - base
    if gain + _MARGIN_TOLERANCE >= required:
        return True, f"{head}: ROUGE-L gain {gain:+.3f} ≥ required {required:.3f}"
    return False, f"{head}: ROUGE-L gain {gain:+.3f} < required {required:.3f}"


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value) or abs(value) >= 0.001:
        return f"{value:.3f}"
    return f"{value:.1e}"
