"""The model card: what the adapter is, how it scored and passed the gate, how to load and reproduce it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loraops.config import LoraopsConfig
from loraops.names import LOSS_PLOT_ARTIFACT, MODEL_CARD_ARTIFACT
from loraops.registry.mlflow_model import log_model_card, logged_model_id
from loraops.registry.record import RunRecord, summarize
from loraops.registry.values import flatten_params
from loraops.results import GateDecision, Lineage, Registration, SampleAnswer, TrainResult
from mlflow import MlflowClient

_DESCRIPTION_LIMIT = 4500  # SQL stores cap a version description at 5000 characters
_CARD_PARAM_SECTIONS = ("model", "data", "lora", "quant", "train", "gate")


def publish_model_card(client: MlflowClient, cfg: LoraopsConfig, record: RunRecord, registration: Registration) -> str:
    """Log ``model_card.md`` to the run and, for a registered version, into its MLflow Model and as its description.

    The version number is known only now, after registration, so the card goes into the model last.
    Rewriting all three is idempotent, so a retried registration leaves one card that names its version.
    """
    card = render_model_card(cfg, record, registration)
    client.log_text(registration.run_id, card, MODEL_CARD_ARTIFACT)
    if registration.version is not None:
        model_id = logged_model_id(client.get_model_version(registration.model_name, registration.version))
        if model_id:  # versions registered earlier as plain adapter folders have no LoggedModel
            log_model_card(client, model_id, card)
        client.update_model_version(registration.model_name, registration.version, description=card_description(card))
    return card


def card_description(card: str) -> str:
    """The card's leading sections that fit a version description; the full card stays an artifact."""
    if len(card) <= _DESCRIPTION_LIMIT:
        return card
    head, *sections = card.split("\n## ")
    kept = [head]
    for section in sections:
        if sum(map(len, kept)) + len(section) > _DESCRIPTION_LIMIT:
            break
        kept.append(section)
    return "\n## ".join(kept) + f"\nThe full model card is `{MODEL_CARD_ARTIFACT}` in the model and in the run.\n"


def render_model_card(cfg: LoraopsConfig, record: RunRecord, registration: Registration) -> str:
    version = registration.version
    title = f"{registration.model_name} version {version}" if version else f"{registration.model_name} (not registered)"
    parts = [
        f"# {title}\n\n{summarize(record)}\n",
        _card_how_to_load(registration, record.lineage),
        _card_evaluation(record),
        _card_gate(record.decision),
        _card_base_and_data(record.lineage),
        _card_reproduce(registration, record.lineage),
        _card_samples(record.samples, cfg.registry.card_max_new_tokens),
        _card_training(record.train),
        _card_table("Parameters", _card_params(cfg)),
        _card_table("Lineage tags", {**record.lineage.as_tags(), "mlflow run id": registration.run_id}),
    ]
    return "\n".join(part for part in parts if part)


def _card_params(cfg: LoraopsConfig) -> dict[str, str]:
    """``section.key`` settings of the sections that shape the adapter (nested policies stay in the run)."""
    dumped = cfg.model_dump(mode="json")
    flat = flatten_params({section: dumped[section] for section in _CARD_PARAM_SECTIONS})
    return {key: value for key, value in flat.items() if key.count(".") == 1}


def _card_how_to_load(registration: Registration, lineage: Lineage) -> str:
    if registration.version is None:
        return "## How to load\n\nNot registered: the gate failed, so no `models:/` URI points at this adapter.\n"
    uri = f"models:/{registration.model_name}/{registration.version}"
    base = lineage.base_model
    base_path = "models/base" if base.startswith("pypi:") else base
    where = f"`loraops stage prepare-base-model` converts {base} here" if base_path != base else "the base model"
    revision = f", revision={lineage.base_revision!r}" if lineage.base_revision else ""
    return f"""## How to load

```bash
loraops generate --model {uri} "Hello, who are you?"
loraops generate --model models:/{registration.model_name}@champion "Hello"   # once promoted
mlflow models serve -m {uri} --env-manager local   # POST /invocations {{"inputs": [{{"messages": [...]}}]}}
```

```python
import mlflow  # MLFLOW_TRACKING_URI must point at this registry; no loraops needed
model = mlflow.pyfunc.load_model("{uri}")
print(model.predict([{{"messages": [{{"role": "user", "content": "Hello"}}]}}], params={{"max_new_tokens": 64}}))
```

Or by hand with peft (the adapter folder is inside the MLflow model, under `artifacts/`):

```python
from pathlib import Path

import mlflow
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = mlflow.artifacts.download_artifacts("{uri}")
adapter_dir = next(path for path in Path(model_dir, "artifacts").iterdir() if path.is_dir())
base_path = "{base_path}"  # {where}
tokenizer = AutoTokenizer.from_pretrained(base_path{revision})
base = AutoModelForCausalLM.from_pretrained(base_path{revision}, use_safetensors=True)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
inputs = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "Hello"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def _card_evaluation(record: RunRecord) -> str:
    rows = [("base model", record.baseline), ("adapter", record.candidate)]
    lines = [
        "## Evaluation (validation split, target tokens only)\n",
        "| model | loss | perplexity | target tokens | examples |",
        "|---|---|---|---|---|",
        *[f"| {name} | {m.loss:.4f} | {m.perplexity:.2f} | {m.tokens} | {m.examples} |" for name, m in rows],
    ]
    decision = record.decision
    if decision.champion_loss is not None:
        lines.append(f"| champion v{decision.champion_version} | {decision.champion_loss:.4f} | | | |")
    return "\n".join(lines) + "\n"


def _card_gate(decision: GateDecision) -> str:
    from loraops.evaluate.score_table import score_table

    reasons = "\n".join(f"- {reason}" for reason in decision.reasons)
    table = "\n".join(score_table(decision))
    return f"## Gate: {'passed' if decision.passed else 'FAILED'}\n\n{table}\n\n{reasons}\n"


def _card_base_and_data(lineage: Lineage) -> str:
    dirty = " (uncommitted changes)" if lineage.git_dirty else ""
    return (
        "## Base model and data\n\n"
        f"- base model: `{lineage.base_model}` (revision `{lineage.base_revision or 'default'}`)\n"
        f"- data version (DVC md5 of data/): `{lineage.data_md5}`\n"
        f"- dvc.lock md5: `{lineage.dvc_lock_md5}`; params hash `{lineage.params_hash}`\n"
        f"- git commit: `{lineage.git_commit}`{dirty}\n"
    )


def _card_reproduce(registration: Registration, lineage: Lineage) -> str:
    from loraops.lineage.experiments import reproduce_commands

    rebuild = f"loraops reproduce {registration.model_name}/{registration.version}" if registration.version else ""
    if not lineage.dvc_experiment:
        return f"## How to reproduce\n\n`{rebuild}` (from the run's MLflow lineage artifacts)\n" if rebuild else ""
    name, rev = lineage.dvc_experiment, lineage.dvc_experiment_rev or ""
    compare = (
        f"\n{rebuild}   # rebuilds it in a temporary worktree and compares it with this version" if rebuild else ""
    )
    return (
        f"## How to reproduce\n\nThe run is DVC experiment `{name}` (commit `{rev[:12]}`); with DVC alone:\n\n"
        f"```bash\ndvc exp pull origin {name}   # in another clone: fetch the experiment first\n"
        f"{reproduce_commands(name)}\ndvc repro --force   # rebuild every stage; `dvc metrics diff {name}` then shows no change"
        f"{compare}\n```\n"
    )


def _card_samples(samples: Sequence[SampleAnswer], max_new_tokens: int) -> str:
    if not samples:
        return ""
    cell = lambda text: " ".join(text.split()).replace("|", "\\|") or "(empty)"  # noqa: E731
    rows = [f"| {cell(s.prompt)} | {cell(s.base_answer)} | {cell(s.adapter_answer)} |" for s in samples]
    return (
        f"## Samples (validation prompts, greedy, at most {max_new_tokens} new tokens)\n\n"
        "| prompt | base model | adapter |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _card_training(train: TrainResult) -> str:
    fraction = train.trainable_params / max(train.total_params, 1)
    best = f"{train.best_eval_loss:.4f} at step {train.best_step}" if train.best_eval_loss is not None else "n/a"
    return (
        "## Training\n\n"
        f"- steps: {train.steps}{' (stopped early)' if train.stopped_early else ''}; best validation loss {best} (per completion token, as in Evaluation)\n"
        f"- trainable parameters: {train.trainable_params:,} of {train.total_params:,} ({fraction:.2%})\n"
        f"- loss curves: `{LOSS_PLOT_ARTIFACT}`; trainer history: `training/`\n"
    )


def _card_table(title: str, values: Mapping[str, str]) -> str:
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in values.items())
    return f"## {title}\n\n| key | value |\n|---|---|\n{rows}\n"
