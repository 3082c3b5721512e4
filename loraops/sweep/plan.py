"""The sweep's arithmetic: --param values, the trial order, the stop rule, the winner, its table and plot."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from loraops.config import ConfigError, LoraopsConfig, config_from_dict
from loraops.project.params_file import apply_overrides
from loraops.results import TrainResult

RANK_KEY = "lora.r"


class SweepError(ValueError):
    """A sweep that cannot pick a winner: every trial failed or was skipped."""


class SweptParam(BaseModel):
    key: str  # dotted params.yaml key, e.g. lora.r
    values: list[Any]  # as the typed config holds them, in the order given


class Trial(BaseModel):
    index: int
    values: dict[str, Any]

    @property
    def name(self) -> str:
        """A folder, MLflow run and git-ref safe name: ``01-r4-learning_rate0.001``."""
        parts = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in self.values.items()]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.index:02d}-" + "-".join(parts))


class TrialResult(BaseModel):
    trial: Trial
    status: Literal["done", "skipped", "failed"]
    val_loss: float | None = None
    trainable_params: int | None = None
    train_time_s: float | None = None
    peak_memory_bytes: int | None = None
    run_id: str | None = None  # the trial's child MLflow run
    trained: TrainResult | None = None  # in the trial's folders
    experiment: str | None = None  # the trial's DVC experiment
    note: str = ""  # why it was skipped, or the error it failed with


# --- --param ---------------------------------------------------------------------------------


def parse_param(text: str, cfg: LoraopsConfig) -> SweptParam:
    """``lora.r=4,8,16`` -> SweptParam; each value is validated by the typed config (its errors name the setting)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--param '{text}': expected section.key=value1,value2,..., e.g. lora.r=4,8,16")
    values = []
    for item in raw.split(","):
        if not item.strip():
            raise ConfigError(f"--param {key}: an empty value in '{raw}'; separate values with single commas")
        values.append(_validated(cfg, key, _yaml_value(item.strip())))
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"--param {key}: a value is listed twice in '{raw}'")
    return SweptParam(key=key, values=values)


def parse_params(texts: list[str], cfg: LoraopsConfig) -> list[SweptParam]:
    """Every --param, each setting once; at least one."""
    if not texts:
        raise ConfigError("a sweep needs at least one --param, e.g. --param lora.r=4,8,16")
    params = [parse_param(text, cfg) for text in texts]
    keys = [param.key for param in params]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"--param {key} is given twice: list all its values in one --param")
    return params


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _validated(cfg: LoraopsConfig, key: str, value: Any) -> Any:
    """The value as the config holds it (``2e-4`` -> 0.0002); a ConfigError naming ``key`` if it is not valid."""
    checked = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), {key: value}), source=f"--param {key}")
    node: Any = checked
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ConfigError(f"--param {key}: not a setting of params.yaml (e.g. lora.r, train.learning_rate)")
        node = getattr(node, part)
    if isinstance(node, BaseModel):
        raise ConfigError(f"--param {key}: is a section; sweep one of its settings, e.g. {key}.<name>")
    return node


def config_for(cfg: LoraopsConfig, trial: Trial) -> LoraopsConfig:
    """``cfg`` with the trial's values."""
    raw = apply_overrides(cfg.model_dump(mode="json"), trial.values)
    return config_from_dict(raw, source=f"trial {trial.name}")


# --- order and the stop rule -----------------------------------------------------------------


def trial_order(params: list[SweptParam]) -> list[Trial]:
    """Every combination, values in the order given; the first --param varies slowest."""
    combos = itertools.product(*(param.values for param in params))
    return [
        Trial(index=index, values={param.key: value for param, value in zip(params, combo, strict=True)})
        for index, combo in enumerate(combos, start=1)
    ]


def skip_reason(trial: Trial, params: list[SweptParam], done: list[TrialResult], min_gain: float | None) -> str | None:
    """Why ``trial`` is not run under the stop rule, or None to run it.

    Along each parameter (the others fixed), once a step to the next value improved validation loss by less
    than ``min_gain`` nats, the values after it are not tried.
    """
    if min_gain is None:
        return None
    for param in params:
        position = param.values.index(trial.values[param.key])
        for step in range(1, position):
            before, after = (_result_at(done, trial, param, at) for at in (step - 1, step))
            if not (_finished(before) and _finished(after)):
                continue
            gain = before.val_loss - after.val_loss
            if gain < min_gain:
                return (
                    f"{param.key} not raised past {param.values[step]}: from {param.values[step - 1]} "
                    f"it gained {gain:.4f} nats (< {min_gain})"
                )
    return None


def _finished(result: TrialResult | None) -> bool:
    return result is not None and result.status == "done" and result.val_loss is not None


def _result_at(done: list[TrialResult], trial: Trial, param: SweptParam, position: int) -> TrialResult | None:
    wanted = {**trial.values, param.key: param.values[position]}
    return next((result for result in done if result.trial.values == wanted), None)


def next_wave(
    trials: list[Trial], params: list[SweptParam], done: list[TrialResult], min_gain: float | None
) -> list[Trial]:
    """The trials without a result whose stop rule can be decided now: trials to run side by side.

    Without a stop rule, every trial at once. With one, a trial at the third value of a setting or later waits
    for the results of the values before it along that setting (the others fixed), as ``skip_reason`` reads them.
    """
    pending = [trial for trial in trials if not any(result.trial.index == trial.index for result in done)]
    if min_gain is None:
        return pending
    return [trial for trial in pending if all(_result_at(done, trial, *before) for before in _before(trial, params))]


def _before(trial: Trial, params: list[SweptParam]) -> list[tuple[SweptParam, int]]:
    """(setting, position) of the trials whose results the stop rule reads for ``trial``."""
    positions = [(param, param.values.index(trial.values[param.key])) for param in params]
    return [(param, at) for param, position in positions if position >= 2 for at in range(position)]


def finished(results: list[TrialResult]) -> list[TrialResult]:
    """The trials that trained and were evaluated: the candidates for the winner."""
    return [result for result in results if _finished(result)]


def failure_summary(results: list[TrialResult]) -> str:
    """Why no trial can win: each trial and how it ended."""
    ends = "; ".join(f"{result.trial.name} {result.status}: {_first_line(result.note)}" for result in results)
    return f"no sweep trial finished ({ends}): nothing gated or registered"


def _first_line(text: str, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- the winner ------------------------------------------------------------------------------


def pick_winner(results: list[TrialResult], margin: float = 0.0) -> TrialResult:
    """Lowest validation loss; trials within ``margin`` nats of it count as tied and the smaller rank wins."""
    candidates = finished(results)
    if not candidates:
        raise SweepError(failure_summary(results))
    best = min(result.val_loss for result in candidates)
    tied = [result for result in candidates if result.val_loss <= best + margin]
    return min(tied, key=lambda result: (result.trial.values.get(RANK_KEY, 0), result.val_loss, result.trial.index))


# --- table and plot --------------------------------------------------------------------------


def table_markdown(params: list[SweptParam], results: list[TrialResult], winner: TrialResult | None = None) -> str:
    """One row per trial: its values, trainable parameters, validation loss, training time, peak memory.

    The note is why a trial was skipped, or the first line of the error it failed with.
    """
    keys = [param.key for param in params]
    header = ["trial", *keys, "trainable params", "val loss", "train time (s)", "peak memory (MiB)", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        mark = " (winner)" if winner is not None and result.trial.index == winner.trial.index else ""
        cells = [
            result.trial.name + mark,
            *(str(result.trial.values[key]) for key in keys),
            _cell(result.trainable_params, "{:,}"),
            _cell(result.val_loss, "{:.4f}"),
            _cell(result.train_time_s, "{:.1f}"),
            _cell(result.peak_memory_bytes / 2**20 if result.peak_memory_bytes else None, "{:.0f}"),
            _note(result),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _note(result: TrialResult) -> str:
    note = _first_line(result.note).replace("|", "\\|")
    return f"failed: {note}" if result.status == "failed" else note or result.status


def _cell(value: Any, form: str) -> str:
    return "-" if value is None else form.format(value)


def plot_losses(params: list[SweptParam], results: list[TrialResult], path: Path) -> Path:
    """Validation loss against the first swept value; one line per combination of the other values."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    first, others = params[0], params[1:]
    figure, axes = plt.subplots(figsize=(6, 4))
    for combo in itertools.product(*(param.values for param in others)):
        fixed = {param.key: value for param, value in zip(others, combo, strict=True)}
        points = [
            (result.trial.values[first.key], result.val_loss)
            for result in results
            if result.status == "done" and all(result.trial.values[key] == value for key, value in fixed.items())
        ]
        if points:
            label = ", ".join(f"{key}={value}" for key, value in fixed.items()) or None
            axes.plot(*zip(*points, strict=True), marker="o", label=label)
    if all(isinstance(value, int | float) for value in first.values):
        axes.set_xticks(first.values)  # the swept values, not matplotlib's round numbers
    axes.set_xlabel(first.key)
    axes.set_ylabel("validation loss (nats per target token)")
    axes.set_title("sweep: validation loss")
    if others:
        axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
