"""Gather what the gate weighs besides the two losses: bootstrap intervals, forgetting, answer scores.

Per-example validation losses are written by the evaluation stages next to the reports (lists, so not
DVC metrics); the general-text losses ride on the EvalMetrics; answers are generated here, once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loraops.config import LoraopsConfig
from loraops.evaluate.bootstrap import Interval, paired_improvement_interval
from loraops.evaluate.gate import GateEvidence
from loraops.evaluate.loss import example_losses_path
from loraops.results import EvalMetrics, ExampleLosses

log = logging.getLogger(__name__)


def interval(cfg: LoraopsConfig, reference: ExampleLosses | None, candidate: ExampleLosses | None) -> Interval | None:
    if reference is None or candidate is None:
        return None
    gate = cfg.gate
    return paired_improvement_interval(
        reference, candidate, gate.confidence, gate.bootstrap_resamples, gate.bootstrap_seed
    )


def read_example_losses(cfg: LoraopsConfig, root: Path, name: str) -> ExampleLosses | None:
    path = example_losses_path(Path(root) / cfg.paths.reports_dir, name)
    return ExampleLosses.read_json(path) if path.is_file() else None


def collect_evidence(
    cfg: LoraopsConfig,
    root: Path,
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    champion_examples: ExampleLosses | None,
) -> GateEvidence:
    base_examples = read_example_losses(cfg, root, "baseline")
    adapter_examples = read_example_losses(cfg, root, "adapter")
    scores = answer_scores(cfg, root) if cfg.eval.generate else None
    return GateEvidence(
        over_base=interval(cfg, base_examples, adapter_examples),
        over_champion=interval(cfg, champion_examples, adapter_examples),
        general_base_loss=baseline.general_loss,
        general_candidate_loss=candidate.general_loss,
        rouge_l_base=scores[0].rouge_l if scores else None,
        rouge_l_candidate=scores[1].rouge_l if scores else None,
        exact_match_base=scores[0].exact_match if scores else None,
        exact_match_candidate=scores[1].exact_match if scores else None,
    )


def answer_scores(cfg: LoraopsConfig, root: Path):
    """Greedy answers of base and adapter to the first eval.generation_samples validation prompts, scored."""
    from loraops.data.reader import load_split
    from loraops.evaluate.answers import score_answers
    from loraops.train.adapters import AdapterSource, load_adapter, project_base
    from loraops.train.base_model import resolve_device
    from loraops.train.generate import generate_text

    root = Path(root)
    split = load_split(root / cfg.data.validation_file, cfg.data.format)
    chats = [example["messages"] for example in split.examples if "messages" in example][: cfg.eval.generation_samples]
    if not chats:
        log.info("no chat examples in the validation split: answers not scored")
        return None
    adapter_dir = root / cfg.paths.adapter_dir
    source = AdapterSource(str(adapter_dir), adapter_dir, base=project_base(cfg, root), quant=cfg.quant)
    model, tokenizer = load_adapter(source, cfg.model, resolve_device(cfg.train))
    references = [str(chat[-1]["content"]) for chat in chats]
    answers = {}
    for name in ("base", "adapter"):
        with model.disable_adapter() if name == "base" else _nothing():
            answers[name] = [generate_text(model, tokenizer, chat[:-1], cfg.eval.max_new_tokens) for chat in chats]
    return score_answers(answers["base"], references), score_answers(answers["adapter"], references)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()
