"""Training: the base model, LoRA/QLoRA builders, the trainer and checkpoints, memory plans, sanity runs."""
