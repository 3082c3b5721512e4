"""Quality gate: register a candidate adapter only if it beats the base model (and the champion).

An improvement must be strictly positive *and* at least the configured margin, so a margin of 0
still rejects a candidate that merely ties. Losses are only comparable when they were measured
over the same target tokens; a mismatch means different data and fails the gate outright.
"""

from __future__ import annotations

import logging
import math

from loraops.config import GateConfig
from loraops.results import EvalMetrics, GateDecision

logger = logging.getLogger(__name__)

# Float subtraction can land a hair below a margin the user typed exactly (2.81 - 2.80 < 0.01).
_MARGIN_TOLERANCE = 1e-9


def gate_candidate(
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    champion_loss: float | None,
    champion_version: str | None,
    cfg: GateConfig,
) -> GateDecision:
    """Compare validation losses; ``reasons`` explains every comparison with its numbers.

    ``champion_loss`` must have been measured on the same validation data as ``candidate``.
    A champion without a recorded loss cannot be compared: the reasons say so and the gate
    decides on the base comparison alone.
    """
    problem = _comparability_problem(baseline, candidate)
    if problem:
        passed, reasons = False, [problem]
    else:
        passed, reasons = _compare_losses(baseline, candidate, champion_loss, champion_version, cfg)
    decision = GateDecision(
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
) -> tuple[bool, list[str]]:
    passed, reason = _check_improvement(candidate.loss, baseline.loss, "base", cfg.min_improvement_over_base)
    reasons = [reason]
    champion = f"champion v{champion_version}" if champion_version else "champion"
    if champion_loss is not None:
        beats_champion, reason = _check_improvement(
            candidate.loss, champion_loss, champion, cfg.min_improvement_over_champion
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


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value) or abs(value) >= 0.001:
        return f"{value:.3f}"
    return f"{value:.1e}"
