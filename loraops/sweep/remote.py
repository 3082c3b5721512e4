"""Sweep trials on a train deployment (a GPU pool): each trial's hand-off, and its adapter fetched back.

With ``orchestration.train_deployment`` set, the sweep sends its trials to that deployment (the train-adapter
flow that retrain uses, flows/train.py). The dataset goes out once through the DVC remote
(``handoff.prepare_handoff``); each trial gets its own settings (its values, and checkpoint, adapter and
metrics folders of its own under ``sweep/<trial>`` in the worker's checkout), its own train key, and tags that
make the worker's MLflow run a child run of the sweep run, named after the trial. ``fetch_trial`` brings a
finished trial's adapter and history back into the trial's folders here; the sweep then evaluates it as a
trial trained here. No Prefect here: tasks/sweep.py submits the runs and waits for them.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from pydantic import BaseModel

from loraops.config import LoraopsConfig
from loraops.registry import handoff
from loraops.registry.store import client_for
from loraops.results import TrainResult
from loraops.sweep.plan import Trial, config_for
from loraops.sweep.trials import SWEEP_FOLDER, fresh_sweep_folder, trial_paths, trial_tags
from loraops.train.peak_memory import PEAK_MEMORY_METRIC

log = logging.getLogger(__name__)


class RemoteTrial(BaseModel):
    """A trial sent to the train deployment, and how its training run ended."""

    trial: Trial
    train_key: str  # tags the MLflow run its adapter comes back through
    flow_run_id: str | None = None  # its train-adapter flow run
    error: str | None = None  # why that run did not complete; None: it did


def trial_handoff(outgoing: handoff.TrainingHandoff, trial: Trial, parent_run_id: str) -> handoff.TrainingHandoff:
    """The hand-off of one trial: the sweep's dataset, the trial's settings and folders, a train key of its own."""
    cfg = config_for(outgoing.config, trial)
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"output_dir": _under(cfg.train.output_dir, trial)}),
            "paths": cfg.paths.model_copy(
                update={
                    "adapter_dir": str(Path(cfg.paths.adapter_dir).parent / SWEEP_FOLDER / trial.name),
                    "metrics_dir": _under(cfg.paths.metrics_dir, trial),
                }
            ),
        }
    )
    return outgoing.model_copy(
        update={"config": cfg, "train_key": uuid.uuid4().hex, "run_tags": trial_tags(parent_run_id, trial)}
    )


def _under(folder: str, trial: Trial) -> str:
    """``folder/sweep/<trial>``: trials on one worker never share checkpoints or metrics."""
    return str(Path(folder) / SWEEP_FOLDER / trial.name)


def fetch_trial(
    cfg: LoraopsConfig, root: Path, remote: RemoteTrial
) -> tuple[TrainResult, tuple[float | None, int | None]]:
    """The trial's adapter (``adapters/sweep/<trial>``) and history fetched from its MLflow run; as ``train_trial``
    returns them: (result, (training seconds by the trainer's own clock, the peak memory the worker logged))."""
    _, adapter_dir, _ = trial_paths(cfg, root, remote.trial)
    fresh_sweep_folder(adapter_dir)
    metrics_dir = adapter_dir.with_name(f"{remote.trial.name}.metrics")  # train.json, history, loss series
    paths = cfg.paths.model_copy(update={"adapter_dir": str(adapter_dir), "metrics_dir": str(metrics_dir)})
    trained = handoff.fetch_training(cfg.model_copy(update={"paths": paths}), root, remote.train_key)
    log.info("trial %s: adapter fetched from MLflow run %s", remote.trial.name, trained.mlflow_run_id)
    peak = client_for(cfg.registry, root).get_run(trained.mlflow_run_id).data.metrics.get(PEAK_MEMORY_METRIC)
    return trained, (_train_runtime(Path(trained.history_path)), None if peak is None else int(peak))


def _train_runtime(history: Path) -> float | None:
    """The trainer's ``train_runtime`` (seconds; of the last attempt when it resumed), from its log history."""
    rows = json.loads(history.read_text())
    return next((float(row["train_runtime"]) for row in reversed(rows) if "train_runtime" in row), None)
