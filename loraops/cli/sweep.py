"""The ``loraops sweep`` command: one trial per swept value, the best one gated and registered."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from loraops.project.params_file import load_config, parse_override

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The parameters file (DVC-tracked)")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a params.yaml key for every trial, e.g. -S train.max_steps=60"),
]
SweepOption = Annotated[
    list[str],
    typer.Option(
        "--param", help="A setting and its values, tried in this order, e.g. --param lora.r=4,8,16 (repeatable)"
    ),
]
StopOption = Annotated[
    float | None,
    typer.Option(
        "--stop-when-gain-below",
        metavar="NATS",
        help="Stop raising a setting once validation loss improves by less than NATS; also the tie margin",
    ),
]


def add_commands(app: typer.Typer, exit_cleanly_on_user_error: Callable[[], AbstractContextManager]) -> None:
    @app.command("sweep")
    def sweep_command(
        param: SweepOption,
        params: ParamsOption = Path("params.yaml"),
        overrides: SetOption = None,
        stop_when_gain_below: StopOption = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's tracebacks too")] = False,
    ) -> None:
        """Run the Prefect sweep flow: contract and baseline once, a trial per value, the winner gated and registered."""
        from loraops.cli.app import _exit_cleanly_on_termination, _quiet_prefect_tracebacks

        _exit_cleanly_on_termination()
        with exit_cleanly_on_user_error():
            cfg = load_config(params, dict(parse_override(item) for item in overrides or []))
            from loraops.project.servers import check_mlflow_server, check_prefect_api
            from loraops.registry.runs import resolve_tracking_uri
            from loraops.sweep.plan import parse_params

            parse_params(param, cfg)  # a bad --param fails in a second, before Prefect starts
            check_prefect_api()
            check_mlflow_server(resolve_tracking_uri(cfg.registry, params.resolve().parent))
            from flows.sweep import sweep
            from loraops.cli.reporting import closing_lines

            if not (verbose or logging.getLogger().isEnabledFor(logging.DEBUG)):
                _quiet_prefect_tracebacks()
            from loraops.cli.prefect_server import temporary_server_if_needed

            started = time.monotonic()
            with temporary_server_if_needed():  # without a Prefect API: a local server that dies with this command
                result = sweep(
                    param=param,
                    config=cfg,
                    project_dir=str(params.resolve().parent),
                    stop_when_gain_below=stop_when_gain_below,
                )
        typer.echo(f"sweep finished in {time.monotonic() - started:.0f} s")
        from loraops.sweep.plan import table_markdown

        typer.echo(table_markdown(parse_params(param, cfg), result.trials, result.winner))
        for line in closing_lines(result.baseline, result.candidate, result.decision, result.registration):
            typer.echo(line)
