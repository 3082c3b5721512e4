"""The ``loraops sanity`` command: can the pipeline overfit a few training examples before a real run?"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from loraops.names import PARAMS_FILE
from loraops.project.params_file import load_config, parse_override

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The parameters file (DVC-tracked)")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a params.yaml key, e.g. -S sanity.steps=30")
]


def add_commands(app: typer.Typer, exit_cleanly_on_user_error: Callable[[], AbstractContextManager]) -> None:
    @app.command("sanity")
    def sanity_command(params: ParamsOption = Path(PARAMS_FILE), overrides: SetOption = None) -> None:
        """Train on sanity.examples training examples for sanity.steps; exit 0 when the loss falls enough, 1 otherwise.

        Keeps nothing it trains (checkpoints go to a temporary folder) and leaves params.yaml as it is; a base
        not yet prepared is prepared into paths.base_model_dir, as the pipeline would.
        """
        from loraops import stages
        from loraops.project.lock import project_lock

        with exit_cleanly_on_user_error():
            cfg = load_config(params, dict(parse_override(item) for item in overrides or []))
            root = params.resolve().parent
            with project_lock(root, "loraops sanity", cfg.orchestration.lock_timeout_s):
                stages.prepare_base_model(cfg, root)
                result = stages.sanity_check(cfg, root)
        typer.echo(result.summary())
        if not result.passed:
            raise typer.Exit(code=1)
