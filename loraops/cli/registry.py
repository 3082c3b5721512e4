"""Registry commands: promote, rollback, generate, export. They call the same functions as the flows."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated

import typer

from loraops.config import LoraopsConfig
from loraops.names import PARAMS_FILE
from loraops.project.params_file import load_config, parse_override

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The parameters file (DVC-tracked)")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a params.yaml key, e.g. -S export.tolerance=1e-3")
]


@contextmanager
def _registry_errors() -> Iterator[None]:
    """Refusals and unknown versions are the user's to fix: one line, exit 1, no traceback."""
    from loraops.registry.export import ExportMismatchError
    from loraops.registry.integrity import AdapterIntegrityError
    from loraops.registry.promotion import PromotionRefused
    from loraops.train.adapters import UnsafeArtifactError

    refusals = (PromotionRefused, ExportMismatchError, UnsafeArtifactError, AdapterIntegrityError)
    try:
        yield
    except (*refusals, LookupError, FileExistsError) as error:
        message = error.args[0] if isinstance(error, LookupError) and error.args else error
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None


def _project(params: Path, overrides: list[str] | None) -> tuple[LoraopsConfig, Path]:
    cfg = load_config(params, dict(parse_override(item) for item in overrides or []))
    return cfg, params.resolve().parent


def add_commands(app: typer.Typer, exit_cleanly_on_user_error: Callable[[], AbstractContextManager]) -> None:
    @app.command()
    def promote(
        name: Annotated[str, typer.Argument(help="Registered model name")],
        version: Annotated[str, typer.Argument(help="Version number, or an alias such as challenger")],
        force: Annotated[bool, typer.Option(help="Promote even if the gate or the merge check refused it")] = False,
        reason: Annotated[str | None, typer.Option(help="Why (required with --force); recorded on the version")] = None,
        params: ParamsOption = Path(PARAMS_FILE),
        overrides: SetOption = None,
    ) -> None:
        """Make VERSION the champion; the current champion is kept as `previous`."""
        from loraops.registry import promotion

        with exit_cleanly_on_user_error(), _registry_errors():
            cfg, root = _project(params, overrides)
            promotion.require_reason(force, reason)
            check = promotion.check_promotion(cfg, root, name, version, force)
            if check.equivalence is not None:
                typer.echo(check.equivalence.summary())
            state = promotion.apply_promotion(cfg, root, check, force, reason)
            typer.echo(f"{name}: champion -> version {state.champion} (previous: {state.previous})")

    @app.command()
    def rollback(
        name: Annotated[str, typer.Argument(help="Registered model name")],
        reason: Annotated[str | None, typer.Option(help="Recorded on the version rolled back from")] = None,
        params: ParamsOption = Path(PARAMS_FILE),
    ) -> None:
        """Point the champion back at `previous`; `previous` then names the version rolled back from."""
        from loraops.registry import promotion

        with exit_cleanly_on_user_error(), _registry_errors():
            cfg, root = _project(params, None)
            state = promotion.rollback(cfg, root, name, reason)
            typer.echo(f"{name}: champion -> version {state.champion} (previous: {state.previous})")

    @app.command()
    def generate(
        prompt: Annotated[str, typer.Argument(help="The user message")],
        model: Annotated[
            list[str] | None,
            typer.Option(
                "--model",
                "-m",
                help="models:/NAME@ALIAS, models:/NAME/VERSION, an adapter or merged folder; "
                "repeat to answer with several adapters on one base (default: models:/<registry.model_name>@champion)",
            ),
        ] = None,
        base: Annotated[bool, typer.Option("--base", help="Also answer with the base model alone")] = False,
        max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
        temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
        params: ParamsOption = Path(PARAMS_FILE),
        overrides: SetOption = None,
    ) -> None:
        """Answer PROMPT with a registered or local adapter, under the chat template used in training."""
        with exit_cleanly_on_user_error(), _registry_errors():
            cfg, root = _project(params, overrides)
            models = model or [f"models:/{cfg.registry.model_name}@champion"]
            for label, answer in _answers(cfg, root, models, base, prompt, max_new_tokens, temperature):
                typer.echo(answer if len(models) == 1 and not base else f"[{label}] {answer}")

    @app.command()
    def export(
        name: Annotated[str, typer.Argument(help="Registered model name")],
        version: Annotated[str, typer.Argument(help="Version number, or an alias such as champion")],
        merged: Annotated[Path, typer.Option("--merged", help="Folder for the merged model (safetensors + tokenizer)")],
        params: ParamsOption = Path(PARAMS_FILE),
        overrides: SetOption = None,
    ) -> None:
        """Merge the adapter into its base, check the logits match, and save the merged model."""
        from loraops.registry import export as exporting
        from loraops.registry.fetch import fetch_adapter
        from loraops.train.base_model import resolve_device

        with exit_cleanly_on_user_error(), _registry_errors(), tempfile.TemporaryDirectory() as scratch:
            cfg, root = _project(params, overrides)
            uri = f"models:/{name}@{version}" if not version.isdigit() else f"models:/{name}/{version}"
            source = fetch_adapter(cfg, root, uri, Path(scratch))
            report = exporting.export_merged(source, cfg.model, cfg.export, merged, resolve_device(cfg.train))
            typer.echo(report.summary())
            typer.echo(f"merged model written to {merged} (load it with `loraops generate --model {merged} ...`)")


def _answers(
    cfg: LoraopsConfig,
    root: Path,
    models: list[str],
    with_base: bool,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
) -> Iterator[tuple[str, str]]:
    """(label, answer) per model; several adapters share one loaded base and are switched per request."""
    from loraops.registry.fetch import fetch_adapter, parse_model_uri
    from loraops.serve.serving import adapter_name, load_adapters
    from loraops.train.adapters import is_adapter_dir, load_merged
    from loraops.train.base_model import resolve_device
    from loraops.train.generate import generate_text

    device = resolve_device(cfg.train)
    local_merged = [m for m in models if parse_model_uri(m) is None and not is_adapter_dir(Path(m))]
    if local_merged:
        if len(models) > 1 or with_base:
            raise LookupError("a merged model folder is answered alone: pass it as the only --model, without --base")
        loaded, tokenizer = load_merged(Path(models[0]), cfg.model, device)
        yield models[0], generate_text(loaded, tokenizer, prompt, max_new_tokens, temperature)
        return
    with tempfile.TemporaryDirectory() as scratch:
        sources = {adapter_name(m): fetch_adapter(cfg, root, m, Path(scratch)) for m in models}
        switcher = load_adapters(sources, cfg.model, device)
        if with_base:
            yield "base", switcher.generate(prompt, None, max_new_tokens, temperature)
        for name, source in sources.items():
            yield source.label, switcher.generate(prompt, name, max_new_tokens, temperature)
