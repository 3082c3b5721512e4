"""``loraops reproduce NAME/VERSION``: rebuild a registered adapter from its lineage (loraops.cli.app adds it)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from loraops.names import PARAMS_FILE

EXIT_DIFFERS = 1  # the rebuild ran and differs from the registered version
EXIT_CANNOT_REPRODUCE = 2  # nothing was rebuilt: unknown version, no lineage, dirty code, missing commit or data


def add_commands(app: typer.Typer, exit_cleanly_on_user_error: Callable[[], AbstractContextManager]) -> None:
    @app.command()
    def reproduce(
        version: Annotated[str, typer.Argument(help="NAME/VERSION or NAME@ALIAS, e.g. loraops-smollm2-chatterbot/3")],
        params: Annotated[
            Path, typer.Option("--params", "-p", help="The project's params.yaml (its registry section)")
        ] = Path(PARAMS_FILE),
        allow_dirty: Annotated[
            bool, typer.Option(help="Rebuild a version trained from uncommitted code (loraops.git_dirty=True) anyway")
        ] = False,
        tolerance: Annotated[float, typer.Option(help="Largest accepted |validation loss| difference")] = 1e-4,
        weight_tolerance: Annotated[
            float | None, typer.Option(help="Largest accepted |adapter weight| difference; default: reported only")
        ] = None,
        report: Annotated[
            Path | None, typer.Option(help="Also write the full comparison (every tensor) as JSON")
        ] = None,
    ) -> None:
        """Rebuild a registered version from its commit, dvc.lock and data in a temporary git worktree; compare.

        Exit 0 when the rebuilt metrics (and adapter weights, with --weight-tolerance) match, 1 when they
        differ, 2 when the version cannot be rebuilt. The current checkout is never modified.
        """
        from loraops.config import ConfigError
        from loraops.project.params_file import load_config
        from loraops.reproduce.recorded import ReproduceError
        from loraops.reproduce.report import format_report
        from loraops.reproduce.run import reproduce_version

        with exit_cleanly_on_user_error():
            cfg = load_config(params)
        try:
            result = reproduce_version(
                params.resolve().parent,
                cfg.registry,
                version,
                allow_dirty=allow_dirty,
                loss_tolerance=tolerance,
                weight_tolerance=weight_tolerance,
            )
        except (ReproduceError, ConfigError) as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=EXIT_CANNOT_REPRODUCE) from None
        typer.echo(format_report(result))
        if report is not None:
            report.write_text(result.model_dump_json(indent=1) + "\n")
        if not result.matched:
            raise typer.Exit(code=EXIT_DIFFERS)
