"""The model card's samples: greedy answers of the base model and the adapter to distinct validation prompts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loraops.config import LoraopsConfig
from loraops.results import SampleAnswer
from loraops.train.adapters import AdapterSource, load_adapter, project_base
from loraops.train.generate import generate_text

logger = logging.getLogger(__name__)


def distinct_prompts(conversations: list[list[dict[str, Any]]], limit: int) -> list[list[dict[str, Any]]]:
    """The first ``limit`` conversations whose last prompt differs from every earlier one (in file order).

    Validation splits repeat questions with different reference answers; a card should show different prompts.
    """
    seen: set[str] = set()
    chosen = []
    for turns in conversations:
        prompt = " ".join(str(turns[-1].get("content", "")).split()).casefold() if turns else ""
        if prompt in seen:
            continue
        seen.add(prompt)
        chosen.append(turns)
        if len(chosen) == limit:
            break
    return chosen


def validation_samples(cfg: LoraopsConfig, root: Path, adapter_dir: str | Path) -> list[SampleAnswer]:
    """Greedy answers of the base model and the adapter to the first validation prompts."""
    if cfg.registry.card_samples == 0:
        return []
    from loraops.data.reader import load_split
    from loraops.train.base_model import resolve_device

    root = Path(root)
    split = load_split(root / cfg.data.validation_file, cfg.data.format)
    conversations = distinct_prompts(
        [example["messages"][:-1] for example in split.examples if "messages" in example], cfg.registry.card_samples
    )
    if not conversations:
        logger.info("no chat examples in the validation split: the model card has no samples")
        return []
    adapter_dir = Path(adapter_dir) if Path(adapter_dir).is_absolute() else root / adapter_dir
    source = AdapterSource(str(adapter_dir), adapter_dir, base=project_base(cfg, root), quant=cfg.quant)
    model, tokenizer = load_adapter(source, cfg.model, resolve_device(cfg.train))
    answer = lambda turns: generate_text(model, tokenizer, turns, cfg.registry.card_max_new_tokens)  # noqa: E731
    samples = []
    for turns in conversations:
        with model.disable_adapter():
            base_answer = answer(turns)
        samples.append(SampleAnswer(str(turns[-1]["content"]), base_answer=base_answer, adapter_answer=answer(turns)))
    return samples
