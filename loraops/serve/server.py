"""``loraops serve`` assembled from the project: its base model, its MLflow registry, its ``serve`` settings.

The served base is the project's ``model.base`` (resolved as training resolves it: the converted
``pypi:`` default under ``paths.base_model_dir``, a local folder, or a hub id at ``model.revision``),
loaded once with the project's ``quant`` settings; its id in ``/v1/models`` is ``model.base`` as written,
the same string versions record in their ``loraops.base_model`` tag.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loraops.config import LoraopsConfig
from loraops.names import BASE_MODEL_TAG, BASE_REVISION_TAG
from loraops.registry.fetch import base_for_version
from loraops.registry.store import client_for
from loraops.serve.engine import AdapterPool, ServingEngine
from loraops.serve.models import ModelResolver

logger = logging.getLogger(__name__)


def build_engine(cfg: LoraopsConfig, root: Path) -> ServingEngine:
    """Load the project's base model once and connect to its registry."""
    from loraops.train import base_model as modeling

    tags = {BASE_MODEL_TAG: cfg.model.base, BASE_REVISION_TAG: cfg.model.revision or ""}
    ref = base_for_version(cfg, root, tags)
    device = modeling.resolve_device(cfg.train)
    base = modeling.load_base_model(ref, cfg.model, cfg.quant, device).eval()
    tokenizer = modeling.load_tokenizer(ref, cfg.model)
    logger.info("serving base model %s (%s, quant.mode=%s)", cfg.model.base, device, cfg.quant.mode)
    resolver = ModelResolver(client_for(cfg.registry, root), cfg.model.base, cfg.model.revision, cfg.serve.alias_ttl_s)
    return ServingEngine(resolver, AdapterPool(base, cfg.serve.max_adapters), tokenizer, cfg.quant)


def server_config(engine: ServingEngine, cfg: LoraopsConfig, host: str, port: int, api_key: str | None):
    """The uvicorn config of the app over ``engine`` (tests run it in a thread, the CLI in the foreground)."""
    import uvicorn

    from loraops.serve.openai_api import create_app

    app = create_app(engine, cfg.serve.max_tokens, api_key or None)
    return uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def run_server(cfg: LoraopsConfig, root: Path, host: str, port: int, api_key: str | None) -> None:
    """Serve until interrupted."""
    import uvicorn

    engine = build_engine(cfg, root)
    logger.info(
        "OpenAI-compatible API on http://%s:%d/v1 (%s); aliases re-resolved every %g s, at most %d adapters loaded",
        host,
        port,
        "API key required" if api_key else "no API key",
        cfg.serve.alias_ttl_s,
        cfg.serve.max_adapters,
    )
    uvicorn.Server(server_config(engine, cfg, host, port, api_key)).run()
