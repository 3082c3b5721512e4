"""The overfit check: before a real run, the pipeline must be able to memorise a handful of examples.

A setup that cannot drive the training loss down on ``sanity.examples`` training examples in
``sanity.steps`` steps will not learn from the full split either: the check trains a fresh adapter
on them through the same trainer as ``train_adapter`` (checkpoints in a temporary folder, nothing
saved) and passes when the loss over those examples after training is below ``sanity.max_final_ratio``
of the loss before it.
On failure it names the causes it can check: no target tokens left after masking, no trainable
parameters, zero gradients, a learning rate of 0. Imports only the ML stack: no prefect, no mlflow.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from loraops.config import LoraopsConfig
from loraops.data.tokenization import IGNORE_INDEX
from loraops.results import BaseModelRef

log = logging.getLogger(__name__)


class SanityCheckFailed(RuntimeError):
    """The pipeline could not overfit the sanity examples; the message lists the likely causes."""


class SanityResult(BaseModel):
    passed: bool
    examples: int
    target_tokens: int
    steps: int = 0
    trainable_parameters: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    max_final_ratio: float
    seconds: float = 0.0
    causes: list[str] = []

    @property
    def ratio(self) -> float | None:
        if self.first_loss is None or self.final_loss is None or self.first_loss <= 0:
            return None
        return self.final_loss / self.first_loss

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"sanity check {verdict}: {self.examples} training examples, {self.target_tokens} target tokens"]
        if self.ratio is not None:
            lines.append(
                f"loss over the examples {self.first_loss:.4f} -> {self.final_loss:.4f} in {self.steps} steps "
                f"(ratio {self.ratio:.3f}, needed below {self.max_final_ratio}); "
                f"{self.trainable_parameters:,} trainable parameters; {self.seconds:.1f} s"
            )
        lines += [f"likely cause: {cause}" for cause in self.causes]
        return "\n".join(lines)


def target_token_count(dataset) -> int:
    """Tokens that carry a loss (labels not masked), counted as the loss counts them (after the shift)."""
    return sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"])


def sanity_settings(cfg: LoraopsConfig, output_dir: Path) -> LoraopsConfig:
    """The training settings of the check: sanity.steps steps, one evaluation at the end, no resume, no early stop."""
    steps = cfg.sanity.steps
    train = cfg.train.model_copy(
        update={
            "max_steps": steps,
            "eval_steps": steps,
            "save_steps": None,
            "early_stopping_patience": 0,
            "resume": False,
            "output_dir": str(output_dir),
        }
    )
    return cfg.model_copy(update={"train": train})


def check_overfit(cfg: LoraopsConfig, base: BaseModelRef, dataset, device: str | None = None) -> SanityResult:
    """Train a fresh adapter on ``dataset`` (the sanity examples) and judge whether its loss fell enough."""
    from peft.utils.error import NoMatchingPeftModuleError

    from loraops.train import base_model as modeling
    from loraops.train import trainer as training

    limit = cfg.sanity.max_final_ratio
    targets = target_token_count(dataset)
    if targets == 0:
        return SanityResult(
            passed=False,
            examples=len(dataset),
            target_tokens=0,
            max_final_ratio=limit,
            causes=[_no_targets_cause(cfg, dataset)],
        )
    device = device or modeling.resolve_device(cfg.train)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraops-sanity-") as scratch:
        local = sanity_settings(cfg, Path(scratch))
        try:
            trainer = training.build_trainer(local, base, dataset, dataset, device)
        except NoMatchingPeftModuleError as error:  # peft refuses a target list that matches no layer
            trainer, why = None, str(error)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) if trainer else 0
        if trainable == 0:
            return SanityResult(
                passed=False,
                examples=len(dataset),
                target_tokens=targets,
                max_final_ratio=limit,
                causes=[
                    f"no trainable parameters: lora.target_modules ({cfg.lora.target_modules!r}) gave the model "
                    f"no adapter weights to train ({why if trainer is None else 'all frozen'}); use all-linear "
                    "or names of the model's linear layers (e.g. q_proj, v_proj)"
                ],
            )
        before = trainer.evaluate()["eval_loss"]  # the loss over the sanity examples before any step
        trainer.train()  # evaluates them again after the last step (eval_steps = steps); starts a new log
        history = [{"step": 0, "eval_loss": before}, *trainer.state.log_history]
    return judge(
        history, cfg, examples=len(dataset), targets=targets, trainable=trainable, seconds=time.monotonic() - started
    )


def judge(
    history: list[dict], cfg: LoraopsConfig, *, examples: int, targets: int, trainable: int, seconds: float = 0.0
) -> SanityResult:
    """Pass when the loss over the sanity examples after training is below sanity.max_final_ratio of the loss before.

    Both are the gate's token-weighted loss over all the examples (the first and last ``eval_loss`` rows), so
    start and end cover the same tokens: per-step losses each cover another batch and would compare batches.
    """
    rows = [row for row in history if "loss" in row]
    evaluations = [float(row["eval_loss"]) for row in history if "eval_loss" in row]
    limit = cfg.sanity.max_final_ratio
    first, final = (evaluations[0], evaluations[-1]) if len(evaluations) >= 2 else (None, None)
    passed = first is not None and final is not None and first > 0 and final < limit * first
    result = SanityResult(
        passed=passed,
        examples=examples,
        target_tokens=targets,
        steps=len(rows),
        trainable_parameters=trainable,
        first_loss=first,
        final_loss=final,
        max_final_ratio=limit,
        seconds=round(seconds, 2),
    )
    if not passed:
        result.causes = _training_causes(rows, cfg)
    return result


def _training_causes(rows: list[dict], cfg: LoraopsConfig) -> list[str]:
    causes = []
    rates = [row.get("learning_rate") for row in rows if row.get("learning_rate") is not None]
    if cfg.train.learning_rate == 0 or (rates and all(rate == 0 for rate in rates)):
        causes.append(
            f"the learning rate was 0 at every step (train.learning_rate={cfg.train.learning_rate:g}, "
            f"train.lr_scheduler={cfg.train.lr_scheduler}): the adapter never moved; set train.learning_rate "
            "to e.g. 2e-4 (seed) or 1e-3"
        )
    norms = [row.get("grad_norm") for row in rows if row.get("grad_norm") is not None]
    if norms and all(float(norm) == 0 for norm in norms):
        causes.append(
            "the gradients were zero at every step: the loss does not reach the adapter (a frozen or "
            "detached adapter, or a 4-bit base whose kernels drop LoRA gradients); check quant.mode and lora.target_modules"
        )
    if not causes:
        causes.append(
            f"none of the checkable causes (targets, trainable parameters, gradients, learning rate) was found: "
            f"the loss fell too little in sanity.steps={cfg.sanity.steps} steps; raise train.learning_rate "
            f"(now {cfg.train.learning_rate:g}) or sanity.steps, or look at the data"
        )
    return causes


def _no_targets_cause(cfg: LoraopsConfig, dataset) -> str:
    lengths = [len(ids) for ids in dataset["input_ids"]]
    truncated = sum(length >= cfg.data.max_length for length in lengths)
    hint = (
        f"{truncated} of {len(lengths)} examples reach data.max_length ({cfg.data.max_length}): truncation cut off "
        "every answer; raise data.max_length"
        if truncated
        else "check that each example ends with an assistant turn (or an alpaca output) that is not empty"
    )
    return f"no target tokens left after masking: every label of the {len(lengths)} examples is masked; {hint}"
