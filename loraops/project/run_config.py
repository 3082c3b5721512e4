"""Which settings a run chose: the retrain form and ``-S`` mean "params.yaml, with these fields changed".

A Prefect form sends every field, pre-filled from the deployment's defaults (``form_defaults``, run
by ``prefect deploy``: the checkout's params.yaml at deploy time). A field counts as chosen when the
run's parameters give it and its value differs from what was pre-filled; everything else comes
from params.yaml as it is when the run starts, so a run never records a value nobody chose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraops.config import ConfigError, LoraopsConfig, config_from_dict
from loraops.names import PARAMS_FILE
from loraops.project.params_file import flatten, load_config

log = logging.getLogger(__name__)


def form_defaults(params: str = PARAMS_FILE) -> dict[str, Any]:
    """A ``prefect deploy`` build step: the deployment's ``config`` default is the checkout's params.yaml.

    Referenced from infra/prefect.yaml as ``loraops.project.run_config.form_defaults``; a params.yaml that
    does not validate stops the deploy with its message.
    """
    return {"config": load_config(params).model_dump(mode="json")}


def given_values(config: LoraopsConfig) -> dict[str, Any]:
    """The dotted settings the run's parameters spelled out (pydantic's ``model_fields_set``), as JSON."""
    dumped = config.model_dump(mode="json")
    given: dict[str, Any] = {}

    def walk(model: BaseModel, values: dict[str, Any], prefix: str) -> None:
        for name in model.model_fields_set:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, values[name], f"{prefix}{name}.")
            else:
                given[f"{prefix}{name}"] = values[name]

    walk(config, dumped, "")
    return given


def chosen_overrides(config: LoraopsConfig, prefilled: dict[str, Any]) -> dict[str, Any]:
    """The given settings whose values differ from ``prefilled`` (a nested mapping, e.g. the form's defaults)."""
    try:
        baseline = flatten(
            config_from_dict(prefilled, source="the deployment's default config").model_dump(mode="json")
        )
    except ConfigError:  # defaults deployed by an older version of the code: compare with them as written
        baseline = flatten(prefilled)
    missing = object()
    return {key: value for key, value in given_values(config).items() if baseline.get(key, missing) != value}


def resolve_run_config(config: LoraopsConfig | None, root: Path, prefilled: dict[str, Any] | None) -> LoraopsConfig:
    """params.yaml with the values this run chose.

    ``prefilled`` is what the run's form showed: the deployment's default config (the code's defaults
    for a deployment without one); None outside a deployment, where the baseline is params.yaml itself.
    """
    params = root / PARAMS_FILE
    if config is None:
        return load_config(params)
    current = load_config(params)
    overrides = chosen_overrides(config, current.model_dump(mode="json") if prefilled is None else prefilled)
    if overrides:
        log.info(
            "this run's settings: params.yaml with %s", ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))
        )
    else:
        log.info("this run's settings: params.yaml as it is")
    return load_config(params, overrides)
