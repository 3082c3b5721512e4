"""The ``loraops`` command line. Every command runs the same stage functions as the flow and dvc.yaml."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from loraops.config import ConfigError, LoraopsConfig
from loraops.names import DATA_DVC_FILE, PARAMS_FILE
from loraops.project.params_file import load_config, parse_override

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The parameters file (DVC-tracked)")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a params.yaml key, e.g. -S lora.r=8 -S train.max_steps=10"),
]


class UserError(Exception):
    """Raised for problems the user can fix; printed without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from loraops.contract import DataContractError
    from loraops.data.formats import DataError
    from loraops.lineage.versioning import DvcLockedError
    from loraops.project.lock import ProjectLockedError
    from loraops.project.servers import ServerUnreachableError
    from loraops.registry.integrity import AdapterIntegrityError
    from loraops.sweep.plan import SweepError

    errors: list[type[BaseException]] = [
        ConfigError,
        DataError,
        DataContractError,
        UserError,
        FileNotFoundError,
        ServerUnreachableError,
        AdapterIntegrityError,
        ProjectLockedError,
        DvcLockedError,
        SweepError,
    ]
    try:
        from loraops.train.trainer import TrainingDivergedError

        errors.append(TrainingDivergedError)
        from loraops.registry.handoff import HandoffError

        errors.append(HandoffError)
        from loraops.train.sanity import SanityCheckFailed

        errors.append(SanityCheckFailed)
    except ImportError:  # the training extras are optional for data-only installs
        pass
    return tuple(errors)


@contextmanager
def _exit_cleanly_on_user_error():
    try:
        yield
    except _user_errors() as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    except Exception as error:
        line = _unanswered_request(error)
        if line is None:
            raise
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None


def _unanswered_request(error: BaseException) -> str | None:
    """An MLflow request that got no answer (MLflow's "API request to URL failed with exception ..."), as one
    line naming the server without its credentials; None for any other error."""
    import re

    from loraops.project.servers import redact_url

    text = str(error)
    found = re.search(r"API request to (https?://[^/\s]+)\S* failed with exception", text)
    if found is None:
        return None
    return (
        f"MLflow tracking server {redact_url(found.group(1))} did not answer: start it, or point registry.tracking_uri "
        "(or MLFLOW_TRACKING_URI) at a running one; credentials go in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    )


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config(params: Path, overrides: list[str] | None) -> LoraopsConfig:
    return load_config(params, dict(parse_override(item) for item in overrides or []))


@contextmanager
def _project_locked(params: Path, command: str):
    """The project's run lock (loraops/project/lock.py), waiting orchestration.lock_timeout_s."""
    from loraops.project.lock import project_lock
    from loraops.registry.limits import bounded_requests

    cfg = load_config(params)
    with project_lock(params.resolve().parent, command, cfg.orchestration.lock_timeout_s):
        with bounded_requests(cfg.registry.timeout_s):  # a lost tracking server fails the stage within the budget
            yield


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """loraops: specialise LLMs with LoRA/QLoRA under a data contract, a gate and a registry."""
    _configure_logging(verbose)
    _bound_mlflow_requests()


def _bound_mlflow_requests() -> None:
    """MLflow's HTTP retries bounded by the default registry.timeout_s (not minutes per request) for every command,
    unless the environment sets them; runs and stages bound them by their own params.yaml."""
    import os

    from loraops.registry.limits import http_settings

    for name, value in http_settings(LoraopsConfig().registry.timeout_s).items():
        os.environ.setdefault(name, value)


def _exit_cleanly_on_termination() -> None:
    """SIGTERM/SIGHUP end the process through ``sys.exit``, so atexit hooks run.

    The temporary Prefect server (loraops/cli/prefect_server.py) is stopped in an atexit hook; the
    default SIGTERM action would skip it (on Linux the server still dies with its parent).
    """
    import signal

    def stop(signum, _frame):
        typer.secho(f"stopped by {signal.Signals(signum).name}", fg=typer.colors.RED, err=True)
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does but without its traceback; the record itself keeps it,
    so handlers after this one (Prefect's API handler: the run's logs) still get the whole record."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _quiet_prefect_tracebacks() -> None:
    """Prefect logs a failed task's or flow's full traceback to the console; the CLI prints the clear message."""
    for name in (None, "prefect", "prefect.flow_runs", "prefect.task_runs"):  # None: the root logger
        for handler in logging.getLogger(name).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))


@app.command()
def retrain(
    params: ParamsOption = Path(PARAMS_FILE),
    overrides: SetOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's tracebacks too")] = False,
    force: Annotated[bool, typer.Option("--force", help="Train even when nothing changed since the last run")] = False,
    data_rev: Annotated[
        str | None, typer.Option("--data-rev", help="Data registry revision to train on (data.dvc from `dvc import`)")
    ] = None,
) -> None:
    """Run the Prefect retrain flow: refresh data, contract, baseline, train, evaluate, gate, version, register."""
    _exit_cleanly_on_termination()
    with _exit_cleanly_on_user_error():
        cfg = _config(params, overrides)
        from loraops.project.servers import check_mlflow_server, check_prefect_api
        from loraops.registry.store import resolve_tracking_uri

        check_prefect_api()  # fail in a second, not after Prefect's own retries
        check_mlflow_server(resolve_tracking_uri(cfg.registry, params.resolve().parent))
        from flows.retrain import retrain as retrain_flow
        from loraops.cli.reporting import closing_lines

        if not (verbose or logging.getLogger().isEnabledFor(logging.DEBUG)):  # `loraops -v` keeps them too
            _quiet_prefect_tracebacks()

        from loraops.cli.prefect_server import temporary_server_if_needed

        started = time.monotonic()
        with temporary_server_if_needed():  # without a Prefect API: a local server that dies with this command
            result = retrain_flow(config=cfg, project_dir=str(params.resolve().parent), force=force, data_rev=data_rev)
        typer.echo(f"retrain finished in {time.monotonic() - started:.0f} s")
        if getattr(result, "unchanged", False):  # ended early: nothing new to train on
            typer.echo(result.message)
            return
        for line in closing_lines(result.baseline, result.candidate, result.decision, result.registration):
            typer.echo(line)


class DataFormat(StrEnum):
    auto = "auto"
    chat = "chat"
    alpaca = "alpaca"
    text = "text"


@app.command()
def validate(
    path: Annotated[
        Path, typer.Argument(help="A data folder (train.*, optionally validation.*) or one data file", readable=False)
    ],
    validation: Annotated[
        Path | None, typer.Option(help="A validation file: also checks train/validation leakage", readable=False)
    ] = None,
    data_format: Annotated[DataFormat | None, typer.Option("--format", help="Override data.format")] = None,
    max_length: Annotated[int | None, typer.Option(help="Override data.max_length")] = None,
    report_dir: Annotated[
        Path | None, typer.Option(help="Where the report and Data Docs go (default: a new temporary folder)")
    ] = None,
    params: ParamsOption = Path(PARAMS_FILE),
) -> None:
    """Run the data contract on PATH alone; print its summary; exit 0 when it passes, 1 when it fails.

    Writes nothing into the pipeline's outputs (reports/, models/): see loraops/cli/validate.py.
    """
    from loraops.cli import validate as adhoc_validation
    from loraops.contract import format_report

    with _exit_cleanly_on_user_error():
        train_file, validation_file = adhoc_validation.split_files(path, validation)
        overrides: dict[str, object] = {}
        if data_format is not None:
            overrides["data.format"] = data_format.value
        if max_length is not None:
            overrides["data.max_length"] = max_length
        cfg = load_config(params, overrides) if params.exists() else _defaults_with(overrides)
        root = params.resolve().parent
        target = adhoc_validation.report_dir_for(report_dir, cfg, root)
        report = adhoc_validation.validate_files(cfg, root, train_file, validation_file, target)
        typer.echo(format_report(report))
        typer.echo(f"Report written to {target} (the pipeline's reports/ are untouched)")
        if not report.passed:
            raise typer.Exit(code=1)


def _defaults_with(overrides: dict[str, object]) -> LoraopsConfig:
    from loraops.config import config_from_dict
    from loraops.project.params_file import apply_overrides

    return config_from_dict(apply_overrides({}, overrides), source="defaults")


@app.command("import-data")
def import_data(params: ParamsOption = Path(PARAMS_FILE)) -> None:
    """Rebuild data/ from the embedded chatterbot corpus (byte-identical to what data.dvc records)."""
    from loraops import stages

    with _exit_cleanly_on_user_error(), _project_locked(params, "loraops import-data"):
        summary = stages.import_data(load_config(params), params.resolve().parent)
        typer.echo(f"imported {summary}")


@app.command("check-data")
def check_data(
    dvc_file: Annotated[Path, typer.Argument(help="The .dvc file that tracks the data")] = Path(DATA_DVC_FILE),
) -> None:
    """Check that data/ is byte-identical to what data.dvc records; works on a fresh clone without a DVC cache."""
    from loraops.lineage.versioning import VersioningError, tracked_data_problem

    with _exit_cleanly_on_user_error():
        try:
            problem = tracked_data_problem(dvc_file.resolve().parent, dvc_file.name)
        except VersioningError as error:
            raise UserError(str(error)) from None
        if problem:
            raise UserError(problem)
        typer.echo(f"data matches {dvc_file}")


class StageName(StrEnum):
    prepare_base_model = "prepare-base-model"
    validate_dataset = "validate-dataset"
    check_memory = "memory-check"
    resolve_init_adapter = "resolve-init-adapter"
    evaluate_baseline = "evaluate-baseline"
    train_adapter = "train-adapter"
    evaluate_adapter = "evaluate-adapter"


@app.command()
def stage(name: StageName, params: ParamsOption = Path(PARAMS_FILE)) -> None:
    """Run one pipeline stage (what dvc.yaml calls); the flow runs the same functions."""
    from loraops import stages

    runner: Callable = getattr(stages, name.name)
    with _exit_cleanly_on_user_error(), _project_locked(params, f"loraops stage {name.value}"):
        result = runner(load_config(params), params.resolve().parent)
        typer.echo(result.model_dump_json(indent=1) if hasattr(result, "model_dump_json") else str(result))


def _add_area_commands() -> None:
    """Commands of other areas live in their own modules (registry, reproduce, plan); they add themselves here."""
    import importlib

    for module in (
        "loraops.cli.registry",
        "loraops.cli.reproduce",
        "loraops.cli.plan",
        "loraops.cli.sanity",
        "loraops.cli.sweep",
        "loraops.cli.serve",
    ):
        try:
            importlib.import_module(module).add_commands(app, _exit_cleanly_on_user_error)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


_add_area_commands()

if __name__ == "__main__":
    app()
