"""Serve several adapters on one base model: each request names the adapter to use, or none for the base itself.

Adapters come from ``loraops.registry.fetch`` and load from safetensors only. Imports only the ML
stack: no prefect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from loraops.config import ConfigError, ModelConfig
from loraops.train.adapters import AdapterSource, require_safetensors_adapter
from loraops.train.generate import generate_text

logger = logging.getLogger(__name__)


class AdapterSwitcher:
    """One base model with several named adapters; each request picks one, or none for the base."""

    def __init__(self, model, tokenizer, names: Sequence[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.names = list(names)

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[Any]:
        """The model with ``adapter`` active, or with every adapter disabled for None."""
        if adapter is None:
            with self.model.disable_adapter():
                yield self.model
            return
        if adapter not in self.names:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {', '.join(self.names)}")
        self.model.set_adapter(adapter)
        yield self.model

    def generate(self, prompt: str, adapter: str | None, max_new_tokens: int, temperature: float = 0.0) -> str:
        with self.using(adapter) as model:
            return generate_text(model, self.tokenizer, prompt, max_new_tokens, temperature)


def adapter_name(label: str) -> str:
    """A peft adapter name for ``label`` (module names cannot contain '.')."""
    return re.sub(r"[^\w-]+", "_", label).strip("_") or "adapter"


def load_adapters(sources: Mapping[str, AdapterSource], model_cfg: ModelConfig, device: str) -> AdapterSwitcher:
    """Load the shared base once and every adapter on it under its name in ``sources``."""
    from peft import PeftModel

    from loraops.train import base_model as modeling

    first = next(iter(sources.values()))
    for source in sources.values():
        same_base = (source.base.path, source.base.revision) == (first.base.path, first.base.revision)
        if not same_base or source.quant != first.quant:
            raise ConfigError(
                f"{source.label} was trained on {source.base.source} ({source.quant.mode}) but {first.label} on "
                f"{first.base.source} ({first.quant.mode}): adapters share one base model only when it is the same"
            )
        require_safetensors_adapter(source.adapter_dir)
    base = modeling.load_base_model(first.base, model_cfg, first.quant, device)
    model = None
    for name, source in sources.items():
        if model is None:
            model = PeftModel.from_pretrained(base, source.adapter_dir, adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(source.adapter_dir, adapter_name=name, is_trainable=False)
        logger.info("adapter %s loaded from %s", name, source.label)
    return AdapterSwitcher(model.eval(), modeling.load_tokenizer(first.base, model_cfg), list(sources))
