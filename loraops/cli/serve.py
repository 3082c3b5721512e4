"""``loraops serve``: the OpenAI-compatible server of the base model and the registry's adapters (loraops/serve/)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from loraops.names import PARAMS_FILE
from loraops.project.params_file import load_config, parse_override


def add_commands(app: typer.Typer, exit_cleanly_on_user_error: Callable[[], AbstractContextManager]) -> None:
    @app.command()
    def serve(
        host: Annotated[str | None, typer.Option(help="Interface to listen on (default: serve.host)")] = None,
        port: Annotated[int | None, typer.Option(min=1, max=65535, help="TCP port (default: serve.port)")] = None,
        api_key: Annotated[
            str | None,
            typer.Option(
                envvar="LORAOPS_API_KEY",
                show_default=False,
                help="Require `Authorization: Bearer KEY` on /v1 (prefer the LORAOPS_API_KEY variable: "
                "a command line is visible to other users)",
            ),
        ] = None,
        params: Annotated[Path, typer.Option("--params", "-p", help="The parameters file")] = Path(PARAMS_FILE),
        overrides: Annotated[
            list[str] | None, typer.Option("--set", "-S", help="Override a key, e.g. -S serve.max_adapters=8")
        ] = None,
    ) -> None:
        """Serve the base model and every registered adapter over an OpenAI-compatible API, following aliases."""
        from loraops.serve.server import run_server

        with exit_cleanly_on_user_error():
            cfg = load_config(params, dict(parse_override(item) for item in overrides or []))
            run_server(cfg, params.resolve().parent, host or cfg.serve.host, port or cfg.serve.port, api_key)
