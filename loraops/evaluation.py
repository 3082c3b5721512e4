"""The one validation loss that the gate compares for the base model and the adapter.

Token-weighted mean negative log-likelihood over the target tokens (``labels != -100``) of a dataset
built by ``loraops.tokenization.build_dataset``. Every target token weighs the same whatever batch it
lands in, so the number does not depend on the batch size or on how examples are grouped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

from loraops.results import EvalMetrics
from loraops.tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)


def evaluate_loss(model, dataset, batch_size: int) -> EvalMetrics:
    """Mean NLL per target token of ``model`` on ``dataset`` (``input_ids`` and ``labels`` columns)."""
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    total_nll, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in _length_sorted_batches(dataset, batch_size):
                batch_nll, batch_tokens = _batch_nll(model, batch)
                total_nll += batch_nll
                tokens += batch_tokens
    finally:
        model.train(was_training)
    metrics = EvalMetrics.from_totals(total_nll, tokens, examples=len(dataset))
    logger.info("Loss %.4f (perplexity %.2f) over %d target tokens", metrics.loss, metrics.perplexity, tokens)
    return metrics


def _length_sorted_batches(dataset, batch_size: int) -> Iterator[list[dict]]:
    """Longest first, so similar lengths share a batch and an out-of-memory error shows up at once."""
    order = sorted(range(len(dataset)), key=lambda index: len(dataset[index]["input_ids"]), reverse=True)
    for start in range(0, len(order), batch_size):
        yield [dataset[index] for index in order[start : start + batch_size]]


def _pad_right(examples: list[dict], device) -> dict:
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


def _batch_nll(model, examples: list[dict]) -> tuple[float, int]:
    """Summed NLL and count of the batch's target tokens (token t predicts label t + 1)."""
    import torch

    batch = _pad_right(examples, _input_device(model))
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if not mask.any():
        return 0.0, 0
    # Logits only where a target is predicted: the full (batch, length, vocab) tensor is large.
    keep = _prediction_positions(mask)
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
    )
    logits = outputs.logits
    if logits.dim() == 3:  # a model that ignores a mask in logits_to_keep returns every position
        logits = logits[keep]
    nll = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
    total = nll.double().item()
    if not math.isfinite(total):
        logger.warning("Non-finite loss in an evaluation batch of %d examples", len(examples))
    return total, int(mask.sum().item())


def _prediction_positions(target_mask):
    """Boolean (batch, length) mask of the positions whose next token is a target."""
    import torch

    keep = torch.zeros((target_mask.size(0), target_mask.size(1) + 1), dtype=torch.bool, device=target_mask.device)
    keep[:, :-1] = target_mask
    return keep


def _input_device(model):
    return next(model.parameters()).device
