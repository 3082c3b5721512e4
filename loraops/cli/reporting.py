"""Markdown summaries of stage results, for Prefect artifacts and the CLI's closing lines."""

from __future__ import annotations

from loraops.evaluate.score_table import score_table
from loraops.results import ContractReport, EvalMetrics, GateDecision, Registration, TrainResult


def contract_markdown(report: ContractReport) -> str:
    """One row per expectation (observed value, threshold, verdict), then quarantined rows and Data Docs."""
    verdict = "passed" if report.passed else "FAILED"
    lines = [
        f"# Data contract {verdict}",
        f"Format `{report.format}`: {report.train_rows} train rows, {report.validation_rows} validation rows.",
        "",
        "| expectation | split | severity | result | observed | threshold |",
        "|---|---|---|---|---|---|",
    ]
    for check in report.checks:
        result = "pass" if check.passed else ("warn" if check.severity == "warn" else "**fail**")
        result = result if check.checked else "not checked"
        lines.append(
            f"| {check.expectation} | {check.split} | {check.severity} | {result} | {check.observed} | {check.threshold} |"
        )
    failing = [check for check in report.checks if not check.passed and check.checked]
    if failing:
        lines += ["", "## Failing rows"]
        for check in failing:
            lines.append(f"- **{check.split} {check.expectation}** — {check.hint}")
            lines += [f"  - `{example}`" for example in check.examples]
    if report.quarantine:
        lines += ["", "## Quarantined (left out of training and evaluation)", "", "| split | rows | by rule | file |"]
        lines.append("|---|---|---|---|")
        for record in report.quarantine.values():
            kinds = ", ".join(f"{rule} {count}" for rule, count in record.by_rule.items())
            lines.append(f"| {record.split} | {record.rows} | {kinds} | `{record.path}` |")
    if report.data_docs:
        lines += ["", f"Great Expectations Data Docs: `{report.data_docs}`"]
    return "\n".join(lines)


def evaluation_markdown(baseline: EvalMetrics, candidate: EvalMetrics, decision: GateDecision) -> str:
    verdict = "passed" if decision.passed else "FAILED"
    lines = [
        f"# Gate {verdict}",
        "| model | validation loss | perplexity | target tokens |",
        "|---|---|---|---|",
        f"| base | {baseline.loss:.4f} | {baseline.perplexity:.2f} | {baseline.tokens} |",
        f"| adapter | {candidate.loss:.4f} | {candidate.perplexity:.2f} | {candidate.tokens} |",
    ]
    if decision.champion_loss is not None:
        lines.append(f"| champion v{decision.champion_version} | {decision.champion_loss:.4f} | | |")
    lines += ["", *score_table(decision)]
    lines += ["", *[f"- {reason}" for reason in decision.reasons]]
    return "\n".join(lines)


def training_markdown(trained: TrainResult, where: str | None = None) -> str:
    """Steps, best validation checkpoint, resume and where the adapter went."""
    resumed = (
        f"resumed from the checkpoint at step {trained.resumed_from_step}"
        if trained.resumed_from_step is not None
        else "started afresh"
    )
    best = f"{trained.best_eval_loss:.4f} at step {trained.best_step}" if trained.best_eval_loss is not None else "n/a"
    lines = [
        "# Training",
        "| steps | stopped early | best validation loss (restored; the gate's per-token measure) | trainable / total params | run |",
        "|---|---|---|---|---|",
        f"| {trained.steps} | {'yes' if trained.stopped_early else 'no'} | {best} | "
        f"{trained.trainable_params:,} / {trained.total_params:,} | {resumed} |",
    ]
    if where:
        lines += ["", f"Adapter: {where}"]
    return "\n".join(lines)


def registration_markdown(registration: Registration, tracking_url: str | None) -> str:
    if registration.version is None:
        body = f"Gate failed: MLflow run `{registration.run_id}` logged, nothing registered."
    else:
        aliases = ", ".join(f"`@{alias}`" for alias in registration.aliases) or "none"
        body = f"Registered `{registration.model_name}` version **{registration.version}** (aliases {aliases})."
    link = f"\n\nMLflow: {tracking_url}" if tracking_url else ""
    return f"# Registry\n{body}{link}"


def closing_lines(
    baseline: EvalMetrics, candidate: EvalMetrics, decision: GateDecision, registration: Registration
) -> list[str]:
    """What `loraops retrain` and `make demo` print at the end."""
    lines = [
        f"baseline validation loss: {baseline.loss:.4f} (perplexity {baseline.perplexity:.2f})",
        f"adapter  validation loss: {candidate.loss:.4f} (perplexity {candidate.perplexity:.2f})",
        f"gate: {'PASSED' if decision.passed else 'FAILED'}",
        *[f"  - {reason}" for reason in decision.reasons],
    ]
    if registration.version is None:
        lines.append(f"registry: nothing registered (MLflow run {registration.run_id})")
    else:
        aliases = ", ".join(f"@{alias}" for alias in registration.aliases)
        lines.append(
            f"registry: {registration.model_name} version {registration.version} [{aliases}] (run {registration.run_id})"
        )
    return lines
