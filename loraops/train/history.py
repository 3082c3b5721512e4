"""The trainer's log history: train_history.json and the two loss series ``dvc plots`` draws."""

from __future__ import annotations

import json
from pathlib import Path


def write_history(log_history: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log_history, indent=2) + "\n")


def write_loss_plots(history_path: Path, plots_dir: Path) -> None:
    """Split the trainer's log history into the two series ``dvc plots`` draws."""
    history = json.loads(history_path.read_text())
    series = {
        "train_loss.json": [{"step": row["step"], "loss": row["loss"]} for row in history if "loss" in row],
        "eval_loss.json": [
            {"step": row["step"], "eval_loss": row["eval_loss"]} for row in history if "eval_loss" in row
        ],
    }
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in series.items():
        (plots_dir / name).write_text(json.dumps(rows, indent=1) + "\n")
