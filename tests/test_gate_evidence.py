"""The gate stage on a real tiny project: per-example losses kept, interval, forgetting and answer scores
computed and recorded in metrics/gate.json (numbers only) and on the live MLflow run."""

from __future__ import annotations

import json

import pytest

from loraops import stages
from loraops.evaluate.loss import example_losses_path
from loraops.project.params_file import load_config
from loraops.results import ExampleLosses


@pytest.mark.slow  # trains the tiny model 8 steps and generates: ~1 min on 2 busy cores
def test_the_gate_stage_records_every_check(tiny_project):
    root = tiny_project
    cfg = load_config(root / "params.yaml")
    stages.prepare_base_model(cfg, root)
    baseline = stages.evaluate_baseline(cfg, root)
    trained = stages.train_adapter(cfg, root)
    candidate = stages.evaluate_adapter(cfg, root)

    base_examples = ExampleLosses.read_json(example_losses_path(root / "reports", "baseline"))
    assert sum(base_examples.tokens) == baseline.tokens and len(base_examples.nll) == baseline.examples
    assert baseline.general_loss is not None and candidate.general_loss is not None

    decision = stages.gate_candidate(cfg, root, baseline, candidate)

    gate_json = json.loads((root / "metrics" / "gate.json").read_text())
    for key in (
        "improvement_over_base_low",
        "improvement_over_base_high",
        "general_base_loss",
        "general_candidate_loss",
        "rouge_l_base",
        "rouge_l_candidate",
        "exact_match_base",
        "exact_match_candidate",
    ):
        assert isinstance(gate_json[key], int | float), key
    assert (
        gate_json["improvement_over_base_low"]
        <= baseline.loss - candidate.loss
        <= gate_json["improvement_over_base_high"]
    )
    assert len(decision.reasons) == 4 and "95% CI" in decision.reasons[0]
    assert decision.reasons[2].startswith("general-text loss") and decision.reasons[3].startswith("ROUGE-L")
    from loraops.registry.store import client_for

    run = client_for(cfg.registry, root).get_run(trained.mlflow_run_id)
    assert run.data.metrics["gate_general_candidate_loss"] == pytest.approx(candidate.general_loss)
    assert "gate_rouge_l_candidate" in run.data.metrics and "adapter_general_loss" in run.data.metrics
