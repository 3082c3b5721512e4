"""The config and the trainer's history as MLflow params and metrics: flattened, secrets redacted, batched."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import Metric, Param

from loraops.config import LoraopsConfig
from mlflow import MlflowClient

BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch call
_SECRET_WORDS = ("password", "secret", "token", "api_key")


def log_new_params(client: MlflowClient, run_id: str, cfg: LoraopsConfig) -> None:
    """The config as params, except keys the run already holds (MLflow refuses to change a param)."""
    existing = client.get_run(run_id).data.params
    flat = flatten_params(cfg.model_dump(mode="json"))
    params = [Param(key, value) for key, value in flat.items() if key not in existing]
    for start in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[start : start + BATCH])


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 16}}`` -> ``{"lora.r": "16"}``; secrets and URL credentials redacted."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _redact(name, json.dumps(value) if isinstance(value, list) else str(value))
    return flat


def _redact(name: str, value: str) -> str:
    leaf = name.rsplit(".", 1)[-1].lower()  # hf_token or api_key, not max_tokens or tokenizes
    if leaf in _SECRET_WORDS or any(word in leaf.split("_") for word in _SECRET_WORDS) or "api_key" in leaf:
        return "***"
    value = redact_secret_values(value)
    try:
        parts = urlsplit(value)
        has_password = bool(parts.password)
    except ValueError:  # not a URL (e.g. an unbalanced '[')
        return value
    if has_password:
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return value


_URL_CREDENTIALS = r"(?<=://)[^/\s@]+:[^/\s@]+@"  # the user:password@ of a URL (e.g. registry.tracking_uri)


def redact_secret_values(text: str) -> str:
    """Replace whatever the data contract's secret patterns match (API keys, tokens, key blocks) by ``***``,
    and a URL's ``user:password@`` by ``***@``."""
    from loraops.contract import SECRET_PATTERNS

    for pattern in SECRET_PATTERNS.values():
        text = re.sub(pattern, "***", text)
    return re.sub(_URL_CREDENTIALS, "***@", text)


def redact_nested(values: Any) -> Any:
    """``values`` (JSON: dicts, lists, strings…) with :func:`redact_secret_values` applied to every string."""
    if isinstance(values, str):
        return redact_secret_values(values)
    if isinstance(values, Mapping):
        return {key: redact_nested(value) for key, value in values.items()}
    if isinstance(values, list | tuple):
        return [redact_nested(value) for value in values]
    return values


def redacted_file(path: Path, scratch: Path) -> Path:
    """``path`` itself, or a copy under ``scratch`` with secret-looking values replaced (for a logged params.yaml)."""
    text = path.read_text(encoding="utf-8")
    redacted = redact_secret_values(text)
    if redacted == text:
        return path
    copy = scratch / path.name
    copy.write_text(redacted, encoding="utf-8")
    return copy


def history_metrics(path: Path) -> list[Metric]:
    """Every numeric value of the trainer's log history at its step (loss, eval_loss, learning_rate…)."""
    history = json.loads(path.read_text())
    if not isinstance(history, list):
        raise ValueError(f"{path}: expected the trainer's log history (a JSON list of entries with 'step')")
    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, int(entry.get("step", 0)))
        for entry in history
        for key, value in entry.items()
        if key != "step" and is_number(value)
    ]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
