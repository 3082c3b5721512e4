"""Generate from a loaded model with the prompts training saw: the chat template plus the generation prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def chat_inputs(tokenizer, prompt: str | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Token ids of a user prompt (or earlier turns) as training saw prompts: template plus generation prompt."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        ids = list(encoded["input_ids"])
    else:  # plain-text training data: the prompt is a text prefix
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}


def generate_ids(
    model, tokenizer, prompt: str | Sequence[Mapping[str, Any]], max_new_tokens: int, temperature: float = 0.0
) -> list[int]:
    """The new token ids the model produces for ``prompt``; greedy unless ``temperature`` > 0."""
    import torch

    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in chat_inputs(tokenizer, prompt).items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def generate_text(
    model, tokenizer, prompt: str | Sequence[Mapping[str, Any]], max_new_tokens: int, temperature: float = 0.0
) -> str:
    ids = generate_ids(model, tokenizer, prompt, max_new_tokens, temperature)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
