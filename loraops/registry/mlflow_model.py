"""Log a trained adapter as an MLflow Model (an MLflow 3 LoggedModel ``models:/m-…``) that loads anywhere.

The model is a pyfunc written as *models from code* (``loraops/registry/pyfunc_model.py``, nothing pickled)
holding the PEFT adapter folder unchanged under ``artifacts/adapter/``, a model config naming the
base (source, revision, 4-bit settings, generation defaults), a signature with an input example and
pinned pip requirements, and (once the version exists) the model card. ``mlflow.pyfunc.load_model(
"models:/NAME@champion")`` and ``mlflow models serve`` then need no loraops checkout.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo

import mlflow
from loraops.config import LoraopsConfig
from loraops.names import BASE_MODEL_TAG, LOGGED_MODEL_NAME, MODEL_CARD_ARTIFACT, PYFUNC_ADAPTER_ARTIFACT
from loraops.results import Lineage
from mlflow import MlflowClient

logger = logging.getLogger(__name__)

MLMODEL_FILE = "MLmodel"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello, who are you?"}]}
_ALWAYS = ("mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


def model_config(cfg: LoraopsConfig, lineage: Lineage) -> dict[str, Any]:
    """What the pyfunc needs to rebuild the base as trained: source, revision, quantisation, generation defaults."""
    return {
        "base_model": lineage.base_model,
        "base_revision": lineage.base_revision or "",
        "quant": cfg.quant.model_dump(mode="json"),
        "generation": {"max_new_tokens": cfg.registry.card_max_new_tokens, "temperature": 0.0},
    }


def pip_requirements(cfg: LoraopsConfig, base_model: str) -> list[str]:
    """Installed versions of what loading needs, pinned: + bitsandbytes for QLoRA, gguf and the pypi: base's package."""
    names = list(_ALWAYS)
    if cfg.quant.enabled:
        names.append("bitsandbytes")
    if base_model.startswith("pypi:"):
        names += ["gguf", base_model.removeprefix("pypi:").partition("/")[0]]
    return [f"{name}=={importlib.metadata.version(name)}" for name in names if _installed(name)]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        logger.warning("%s is not installed here: not pinned in the adapter model's requirements", name)
        return False
    return True


def signature(cfg: LoraopsConfig) -> ModelSignature:
    """Rows hold ``messages`` (OpenAI-style chat) or a ``prompt`` string; params are the generation settings."""
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema(
            [ColSpec(Array(message), "messages", required=False), ColSpec("string", "prompt", required=False)]
        ),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", cfg.registry.card_max_new_tokens),
                ParamSpec("temperature", "double", 0.0),
            ]
        ),
    )


@contextmanager
def tracking_uri_set(client: MlflowClient) -> Iterator[None]:
    """MLflow's fluent logging reads the global tracking and registry URIs: point them at ``client``'s, then restore."""
    import os

    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client._registry_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def register_model_version(
    client: MlflowClient, model_name: str, info: ModelInfo, run_id: str, tags: dict[str, str], description: str
):
    """A version of ``model_name`` whose source is the LoggedModel ``models:/m-…`` (the registry resolves it)."""
    with tracking_uri_set(client):
        return client.create_model_version(
            model_name, source=info.model_uri, run_id=run_id, tags=tags, description=description, model_id=info.model_id
        )


def log_adapter_model(
    client: MlflowClient, run_id: str, cfg: LoraopsConfig, adapter_dir: str | Path, lineage: Lineage, step: int
) -> ModelInfo:
    """Log ``adapter_dir`` as an MLflow Model into run ``run_id``; its metrics at ``step`` go onto the LoggedModel."""
    from mlflow.models import Model

    run = client.get_run(run_id)
    # Created here, not by Model.log, which would file it under the process's active (else Default) experiment
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=LOGGED_MODEL_NAME,
        source_run_id=run_id,
        params={key: str(value) for key, value in run.data.params.items()},
    )
    with tracking_uri_set(client):
        info = Model.log(
            artifact_path=None,
            name=LOGGED_MODEL_NAME,
            model_id=logged.model_id,
            flavor=_PYFUNC_UNCHECKED,
            validate_serving_input=False,
            run_id=run_id,
            step=step,
            python_model=str(MODEL_CODE),
            artifacts={PYFUNC_ADAPTER_ARTIFACT: str(adapter_dir)},
            model_config=model_config(cfg, lineage),
            signature=signature(cfg),
            input_example=(INPUT_EXAMPLE, {"max_new_tokens": 8}),
            pip_requirements=pip_requirements(cfg, lineage.base_model),
            metadata={BASE_MODEL_TAG: lineage.base_model},
        )
    logger.info("logged adapter model %s into run %s", info.model_uri, run_id)
    return info


def _save_pyfunc(validate_serving_input: bool = True, **kwargs: Any) -> None:
    """``mlflow.pyfunc.save_model``, which refuses the ``validate_serving_input`` flag that ``Model.log`` reads.

    With ``validate_serving_input=False`` ``Model.log`` keeps the input example (saved, and shown by
    MLflow and ``mlflow models serve``) but does not load the model to run it: that check would load
    the base once more (minutes for a real base on CPU) only to answer one example. MLflow's own
    transformers flavour skips the check the same way for models logged from a checkpoint path.
    """
    mlflow.pyfunc.save_model(**kwargs)


_PYFUNC_UNCHECKED = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


def log_model_card(client: MlflowClient, model_id: str, card: str) -> None:
    """Write ``model_card.md`` next to the MLmodel of LoggedModel ``model_id`` (rewritten on a retry).

    Logged after registration, so the card names its version: whoever downloads
    ``models:/NAME@champion`` gets the card with the model.
    """
    with tempfile.TemporaryDirectory(prefix="loraops-card-") as scratch, tracking_uri_set(client):
        path = Path(scratch) / MODEL_CARD_ARTIFACT
        path.write_text(card, encoding="utf-8")
        client.log_model_artifact(model_id, str(path))


def logged_model_id(version: ModelVersion) -> str | None:
    """The LoggedModel a version was registered from (SQL registries keep only its ``models:/m-…`` source)."""
    if version.model_id:
        return version.model_id
    model_id = (version.source or "").removeprefix("models:/")
    return model_id if model_id != version.source and model_id.startswith("m-") and "/" not in model_id else None


def adapter_folder(model_dir: Path) -> Path:
    """The PEFT adapter inside a downloaded version: where its MLmodel puts it, else (an old version) the folder itself."""
    import yaml

    mlmodel = model_dir / MLMODEL_FILE
    if not mlmodel.is_file():
        return model_dir
    pyfunc = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    path = ((pyfunc.get("artifacts") or {}).get(PYFUNC_ADAPTER_ARTIFACT) or {}).get("path")
    if not path:
        raise FileNotFoundError(
            f"{mlmodel} names no '{PYFUNC_ADAPTER_ARTIFACT}' artifact: it is not a loraops adapter model"
        )
    return model_dir / path
