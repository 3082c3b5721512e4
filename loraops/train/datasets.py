"""The project's splits as training and evaluation see them: quarantined rows left out, then tokenized."""

from __future__ import annotations

import logging
from pathlib import Path

from loraops.config import LoraopsConfig

log = logging.getLogger(__name__)


def load_splits(cfg: LoraopsConfig, root: Path):
    """Both splits as training sees them: without the rows the data contract quarantined."""
    from loraops.contract import quarantined_lines
    from loraops.data.reader import load_split

    splits = []
    for name, relative in (("train", cfg.data.train_file), ("validation", cfg.data.validation_file)):
        split = load_split(Path(root) / relative, cfg.data.format)
        if cfg.data.contract.quarantine:
            lines = quarantined_lines(Path(root) / cfg.paths.reports_dir, name, split.path)
            split = split.without_lines(lines)
            log.info("%s: %d quarantined rows left out, %d rows kept", name, len(lines), len(split))
        splits.append(split)
    return tuple(splits)


def project_tokenizer(cfg: LoraopsConfig, root: Path):
    """The tokenizer of the base model prepared in ``paths.base_model_dir``."""
    from loraops.train import base_model as modeling

    base = modeling.read_base_model_ref(Path(root) / cfg.paths.base_model_dir)
    return modeling.load_tokenizer(base, cfg.model)


def tokenized_splits(cfg: LoraopsConfig, root: Path):
    from loraops.data.tokenization import build_dataset

    train, validation = load_splits(cfg, root)
    tokenizer = project_tokenizer(cfg, root)
    return (
        build_dataset(tokenizer, train.examples, cfg.data.max_length),
        build_dataset(tokenizer, validation.examples, cfg.data.max_length),
    )


def sanity_dataset(cfg: LoraopsConfig, root: Path):
    """The first ``sanity.examples`` training examples, tokenized, for the overfit check."""
    from loraops.data.tokenization import build_dataset

    train, _ = load_splits(cfg, root)
    examples = train.examples[: cfg.sanity.examples]
    return build_dataset(project_tokenizer(cfg, root), examples, cfg.data.max_length)


def validation_dataset(cfg: LoraopsConfig, root: Path):
    from loraops.data.tokenization import build_dataset

    _, validation = load_splits(cfg, root)
    return build_dataset(project_tokenizer(cfg, root), validation.examples, cfg.data.max_length)
