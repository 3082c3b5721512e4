"""Added cost of issue #20's checks on the real SmolLM2 default, per model (base; the adapter costs the same):
the general-text loss (eval.general_examples x eval.general_max_length) and greedy answers
(eval.generation_samples x eval.max_new_tokens). Run: .venv/bin/python bench/eval_cost.py [WORKDIR]."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from loraops.data.reader import load_split
from loraops.evaluate.forgetting import general_loss
from loraops.project.params_file import load_config
from loraops.train import base_model as modeling
from loraops.train.generate import generate_text


def main() -> None:
    cfg = load_config("params.yaml")
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    base = modeling.prepare_base_model(cfg.model, work / "base")
    model = modeling.load_base_model(base, cfg.model, cfg.quant, "cpu")
    print("base model ready", flush=True)
    tokenizer = modeling.load_tokenizer(base, cfg.model)
    start, cpu = time.perf_counter(), time.process_time()
    loss = general_loss(cfg.eval, Path("."), model, tokenizer)
    general_s, general_cpu = time.perf_counter() - start, time.process_time() - cpu
    # CPU seconds too: on a shared machine wall time mostly measures the neighbours.
    print(
        f"general loss {loss:.4f}: {cfg.eval.general_examples} texts in {general_s:.1f} s ({general_cpu:.1f} CPU s) per model",
        flush=True,
    )
    chats = [e["messages"] for e in load_split(Path(cfg.data.validation_file), cfg.data.format).examples]
    chats = chats[: cfg.eval.generation_samples]
    start, cpu = time.perf_counter(), time.process_time()
    for chat in chats:
        generate_text(model, tokenizer, chat[:-1], cfg.eval.max_new_tokens)
    generation_s, generation_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"{len(chats)} greedy answers x {cfg.eval.max_new_tokens} tokens in {generation_s:.1f} s "
        f"({generation_cpu:.1f} CPU s) per model"
    )


if __name__ == "__main__":
    main()
