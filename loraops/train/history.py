"""The training's files: train_history.json, metrics/train.json and the loss series ``dvc plots`` draws."""

from __future__ import annotations

import json
from pathlib import Path

from loraops.names import EVAL_LOSS_PLOT, PLOTS_DIR, TRAIN_LOSS_PLOT, TRAIN_METRICS
from loraops.results import TrainResult, write_metrics


def write_history(log_history: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log_history, indent=2) + "\n")


def record_training(result: TrainResult, metrics_dir: Path) -> None:
    """metrics/train.json and the loss series ``dvc plots`` draws (also for an adapter trained elsewhere)."""
    write_metrics(result.metrics(), metrics_dir / TRAIN_METRICS)
    write_loss_plots(Path(result.history_path), metrics_dir / PLOTS_DIR)


def write_loss_plots(history_path: Path, plots_dir: Path) -> None:
    """Split the trainer's log history into the two series ``dvc plots`` draws."""
    history = json.loads(history_path.read_text())
    series = {
        TRAIN_LOSS_PLOT: [{"step": row["step"], "loss": row["loss"]} for row in history if "loss" in row],
        EVAL_LOSS_PLOT: [{"step": row["step"], "eval_loss": row["eval_loss"]} for row in history if "eval_loss" in row],
    }
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in series.items():
        (plots_dir / name).write_text(json.dumps(rows, indent=1) + "\n")
