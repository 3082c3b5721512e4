"""Base and adapter side by side on every measure the gate weighs (Prefect gate artifact and model card)."""

from __future__ import annotations

from loraops.results import GateDecision

_PAIRS = (
    ("general-text loss (forgetting)", "general_base_loss", "general_candidate_loss", "{:.4f}"),
    ("ROUGE-L F1 of greedy answers", "rouge_l_base", "rouge_l_candidate", "{:.3f}"),
    ("exact match of greedy answers", "exact_match_base", "exact_match_candidate", "{:.3f}"),
)


def score_table(decision: GateDecision) -> list[str]:
    """Markdown rows: validation loss, then each measured extra; the bootstrap intervals below it."""
    lines = [
        "| measure | base | adapter |",
        "|---|---|---|",
        f"| validation loss | {decision.baseline_loss:.4f} | {decision.candidate_loss:.4f} |",
    ]
    numbers = decision.evidence
    for label, base, adapter, form in _PAIRS:
        if base in numbers and adapter in numbers:
            lines.append(f"| {label} | {form.format(numbers[base])} | {form.format(numbers[adapter])} |")
    for name in ("base", "champion"):
        low, high = numbers.get(f"improvement_over_{name}_low"), numbers.get(f"improvement_over_{name}_high")
        if low is not None and high is not None:
            lines.append(f"\nLoss improvement over {name}: bootstrap interval [{low:.4f}, {high:.4f}]")
    return lines
