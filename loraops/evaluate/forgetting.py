"""The forgetting check's data: general text unrelated to the training data, scored as plain-text loss.

The default ships offline on PyPI: ``chitchat-dataset`` 0.9.0 (MIT licence, BYU PCC lab; 7,168 human
open-domain conversations), nothing like the chatterbot Q&A pairs trained on. A user can point
``eval.general_file`` at a JSONL file of ``{"text": ...}`` rows instead. Conversations are taken in
sorted-id order (deterministic) and each is truncated to ``eval.general_max_length`` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraops.config import ConfigError, EvalConfig

CHITCHAT = "pypi:chitchat-dataset"
CHITCHAT_FILE = "chitchat_dataset/dataset.json"


class GeneralTextError(ConfigError):
    """The general-text set named in eval.general_file cannot be read; the message says what to do."""


def general_texts(source: str, count: int, root: Path) -> list[str]:
    """The first ``count`` texts of the general set (``pypi:chitchat-dataset`` or a JSONL file)."""
    texts = _chitchat_texts() if source == CHITCHAT else _jsonl_texts(Path(root) / source)
    if len(texts) < count:
        raise GeneralTextError(
            f"eval.general_file {source}: {len(texts)} texts, fewer than eval.general_examples={count}; "
            "lower eval.general_examples or add texts"
        )
    return texts[:count]


def _chitchat_texts() -> list[str]:
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution("chitchat-dataset").locate_file(CHITCHAT_FILE)))
    except metadata.PackageNotFoundError as error:
        raise GeneralTextError(
            "eval.general_file is pypi:chitchat-dataset but the package is not installed: "
            'pip install chitchat-dataset==0.9.0, or point eval.general_file at a JSONL file of {"text": ...} rows'
        ) from error
    conversations = json.loads(path.read_text())
    return [
        "\n".join(message["text"] for turn in conversations[key]["messages"] for message in turn)
        for key in sorted(conversations)
    ]


def _jsonl_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise GeneralTextError(
            f'eval.general_file {path} does not exist: point it at a JSONL file of {{"text": ...}} rows'
        )
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise GeneralTextError(
                f'{path}:{number}: not valid JSON ({error.msg}); each line must be {{"text": ...}}'
            ) from error
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise GeneralTextError(f'{path}:{number}: needs a non-empty string field "text"')
        texts.append(row["text"])
    return texts


def general_dataset(tokenizer, texts: list[str], max_length: int):
    """Plain-text examples: every token is a target, as for the ``text`` data format."""
    from loraops.data.tokenization import build_dataset

    return build_dataset(tokenizer, [{"text": text} for text in texts], max_length)


def general_loss(cfg: EvalConfig, root: Path, model, tokenizer) -> float | None:
    """Plain-text loss on the general set (same tokens for base and adapter); None when switched off."""
    from loraops.train.token_loss import evaluate_loss

    if cfg.general_examples == 0:
        return None
    texts = general_texts(cfg.general_file, cfg.general_examples, root)
    return evaluate_loss(model, general_dataset(tokenizer, texts, cfg.general_max_length), cfg.batch_size).loss
