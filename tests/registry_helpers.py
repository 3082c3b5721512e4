"""Registry test helpers: small real adapters, registry configs and a pipeline-like registration.

Adapters are made, not trained: peft's LoRA on the tiny Llama with lora_B drawn at random (a fresh
LoRA has B = 0 and changes nothing), saved with ``save_pretrained``. Used by test_serving,
test_promotion, test_export and test_mlflow_server.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from loraops.config import LoraopsConfig, ModelConfig
from loraops.registry.runs import log_and_register
from loraops.registry.store import make_client
from loraops.results import BaseModelRef, EvalMetrics, GateDecision, Lineage, Registration, TrainResult

PROMPT = "What is the capital of France?"


def make_adapter(base_dir: Path, target: Path, seed: int, scale: float = 0.5, safe: bool = True) -> Path:
    """A small real LoRA adapter on ``base_dir`` whose outputs differ from the base (random lora_B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, scale)
    model.save_pretrained(target, safe_serialization=safe)
    return target


def registry_config(store_uri: str, root: Path, **sections) -> LoraopsConfig:
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    return LoraopsConfig(
        registry={"tracking_uri": store_uri, "model_name": name, "experiment": f"exp-{name}", "card_samples": 2},
        export={"check_before_promote": False, **sections.pop("export", {})},
        paths={"base_model_dir": str(root / "models" / "base")},
        **sections,
    )


def register(
    cfg: LoraopsConfig, root: Path, adapter_dir: Path, base_model: str, loss: float = 1.5, client=None, samples=()
) -> Registration:
    """Log and register ``adapter_dir`` as the pipeline would after a passing gate."""
    history = root / f"history-{adapter_dir.name}.json"
    history.write_text(json.dumps([{"loss": 2.4, "step": 1}, {"eval_loss": 2.2, "step": 1}, {"loss": 2.0, "step": 2}]))
    baseline = EvalMetrics.from_totals(2.0 * 100, 100, 4)
    return log_and_register(
        cfg,
        root=root,
        trained=TrainResult(
            adapter_dir=str(adapter_dir),
            trainable_params=1_000,
            total_params=100_000,
            steps=2,
            best_step=2,
            best_eval_loss=loss,
            stopped_early=False,
            history_path=str(history),
        ),
        baseline=baseline,
        candidate=EvalMetrics.from_totals(loss * 100, 100, 4),
        decision=GateDecision(passed=True, reasons=[f"{loss} < 2.0"], baseline_loss=2.0, candidate_loss=loss),
        lineage=Lineage(
            git_commit="0123456789abcdef",
            git_dirty=False,
            data_md5="d" * 32 + ".dir",
            dvc_lock_md5="e" * 32,
            params_hash="f" * 16,
            base_model=base_model,
        ),
        client=client,
        samples=samples,
    )


def prepare_project_base(root: Path, tiny_model_dir: Path) -> BaseModelRef:
    from loraops.train.base_model import prepare_base_model

    return prepare_base_model(ModelConfig(base=str(tiny_model_dir)), root / "models" / "base")


_SHARED_STORE: dict[str, str] = {}


def shared_store_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for every registry test of the session: creating its tables takes seconds.

    Tests stay independent because each registers under its own model and experiment name.
    """
    if "uri" not in _SHARED_STORE:
        uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-store') / 'mlflow.db'}"
        make_client(uri).search_experiments()
        _SHARED_STORE["uri"] = uri
    return _SHARED_STORE["uri"]
