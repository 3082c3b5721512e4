"""The one validation loss that the gate compares, for the base model and for an adapter.

The loss itself is ``loraops.train.token_loss`` (training picks its best checkpoint by the same number);
here it is measured on the project's validation split, with each example's share for the bootstrap
and the general-text loss of the forgetting check.
"""

from __future__ import annotations

from pathlib import Path

from loraops.config import LoraopsConfig
from loraops.names import EXAMPLE_LOSSES_DIR
from loraops.results import EvalMetrics, ExampleLosses


def example_losses_path(reports_dir: Path, name: str) -> Path:
    """``reports/example_losses/{baseline,adapter}.json``: each validation example's NLL and target tokens."""
    return Path(reports_dir) / EXAMPLE_LOSSES_DIR / f"{name}.json"


def evaluate_base_model(cfg: LoraopsConfig, root: Path) -> tuple[EvalMetrics, ExampleLosses]:
    """``evaluate_model`` for the prepared base model, quantised as training will see it."""
    from loraops.train import base_model as modeling

    base = modeling.read_base_model_ref(Path(root) / cfg.paths.base_model_dir)
    device = modeling.resolve_device(cfg.train)
    return evaluate_model(cfg, root, modeling.load_base_model(base, cfg.model, cfg.quant, device))


def evaluate_adapter_dir(cfg: LoraopsConfig, root: Path, adapter_dir: Path) -> tuple[EvalMetrics, ExampleLosses]:
    """``evaluate_model`` for the adapter in ``adapter_dir`` on the prepared base model."""
    from loraops.train import base_model as modeling

    base = modeling.read_base_model_ref(Path(root) / cfg.paths.base_model_dir)
    device = modeling.resolve_device(cfg.train)
    model = modeling.load_adapter_model(base, adapter_dir, cfg.model, cfg.quant, device)
    return evaluate_model(cfg, root, model)


def evaluate_model(cfg: LoraopsConfig, root: Path, model) -> tuple[EvalMetrics, ExampleLosses]:
    """Validation loss (with each example's share, for the bootstrap) and the general-text loss."""
    from loraops.evaluate.forgetting import general_loss
    from loraops.train.datasets import project_tokenizer, validation_dataset
    from loraops.train.token_loss import evaluate_example_losses

    metrics, examples = evaluate_example_losses(model, validation_dataset(cfg, root), cfg.eval.batch_size)
    metrics.general_loss = general_loss(cfg.eval, root, model, project_tokenizer(cfg, root))
    return metrics, examples
