"""Model shapes: the sizes of a Llama-style decoder that decide its memory, and memory sizes as text.

A shape resolves from a local folder's config.json, a well-known hub id (offline), a pypi: GGUF base or
the hub. Pure Python: no torch needed unless a GGUF file or the hub must be read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from loraops.config import ConfigError

GIB = 1 << 30


class ModelShape(BaseModel):
    """The sizes of a Llama-style decoder that decide its memory."""

    model_config = ConfigDict(frozen=True)

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, by its usual module name."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(d_in * d_out for d_in, d_out in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding and output head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.layer_linear_params + self.embedding_params + norms


def _shape(hidden, intermediate, layers, heads, kv_heads, vocab, tied, head_dim=None) -> ModelShape:
    return ModelShape(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        tied_embeddings=tied,
        head_dim=head_dim,
    )


_LLAMA_31_8B = _shape(4096, 14336, 32, 32, 8, 128256, False)
_LLAMA_31_70B = _shape(8192, 28672, 80, 64, 8, 128256, False)
_LLAMA_32_1B = _shape(2048, 8192, 16, 32, 8, 128256, True, 64)
_LLAMA_32_3B = _shape(3072, 8192, 28, 24, 8, 128256, True, 128)
_MISTRAL_7B_V03 = _shape(4096, 14336, 32, 32, 8, 32768, False)
_QWEN25_05B = _shape(896, 4864, 24, 14, 2, 151936, True)
_QWEN25_15B = _shape(1536, 8960, 28, 12, 2, 151936, True)
_QWEN25_7B = _shape(3584, 18944, 28, 28, 4, 152064, False)
_SMOLLM2_135M = _shape(576, 1536, 30, 9, 3, 49152, True, 64)
_SMOLLM2_360M = _shape(960, 2560, 32, 15, 5, 49152, True, 64)
_SMOLLM2_17B = _shape(2048, 8192, 24, 32, 32, 49152, True, 64)

# The hub is unreachable offline: well-known ids resolve from their published config.json values.
KNOWN_MODELS: dict[str, ModelShape] = {
    "meta-llama/Llama-3.1-8B": _LLAMA_31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_31_8B,
    "meta-llama/Llama-3.1-70B": _LLAMA_31_70B,
    "meta-llama/Llama-3.1-70B-Instruct": _LLAMA_31_70B,
    "meta-llama/Llama-3.2-1B": _LLAMA_32_1B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA_32_1B,
    "meta-llama/Llama-3.2-3B": _LLAMA_32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA_32_3B,
    "mistralai/Mistral-7B-v0.3": _MISTRAL_7B_V03,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B_V03,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-360M": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-360M-Instruct": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-1.7B": _SMOLLM2_17B,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _SMOLLM2_17B,
}


def shape_from_config(config: dict) -> ModelShape:
    """A ModelShape from a transformers config (the dict of config.json, or ``PretrainedConfig.to_dict()``)."""
    config = config.get("text_config") or config  # multimodal wrappers keep the decoder here
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            head_dim=config.get("head_dim"),
        )
    except KeyError as missing:
        raise ConfigError(
            f"model config has no {missing}: the memory estimate needs a Llama-style decoder config "
            "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)"
        ) from None


def resolve_model_shape(
    source: str, base_model_dir: str | Path | None = None, revision: str | None = None
) -> ModelShape:
    """The shape of ``model.base``: a local folder, a built-in hub id, the pypi GGUF default, or the hub.

    ``base_model_dir`` (``paths.base_model_dir``) is used when it already holds the converted ``source``.
    """
    local = Path(source).expanduser()
    if (local / "config.json").is_file():
        return shape_from_config(json.loads((local / "config.json").read_text()))
    if local.exists():
        raise ConfigError(f"{source}: no config.json in this folder; pass a folder saved with save_pretrained")
    if source in KNOWN_MODELS:
        return KNOWN_MODELS[source]
    if source.startswith("pypi:"):
        return _gguf_shape(source, base_model_dir)
    return _hub_shape(source, revision)


def _gguf_shape(source: str, base_model_dir: str | Path | None) -> ModelShape:
    from loraops.names import BASE_MARKER_FILE
    from loraops.train.base_model import locate_pypi_file

    if base_model_dir is not None:
        converted = Path(base_model_dir)
        marker = converted / BASE_MARKER_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
            if (converted / "config.json").is_file():
                return shape_from_config(json.loads((converted / "config.json").read_text()))
    from transformers import AutoConfig

    gguf_path = locate_pypi_file(source)
    return shape_from_config(AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).to_dict())


def _hub_shape(source: str, revision: str | None) -> ModelShape:
    families = sorted({name.split("/")[1].replace("-Instruct", "") for name in KNOWN_MODELS})
    hint = (
        f"unknown model {source!r}: not a folder with config.json, nor one of the ids known offline "
        f"({', '.join(families)}, and their -Instruct versions); pass a local folder with config.json"
    )
    if "/" not in source:
        raise ConfigError(hint)
    try:
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(source, revision=revision).to_dict())
    except (OSError, ValueError) as error:  # offline, unknown id, gated repo
        raise ConfigError(f"{hint} (the hub could not provide its config: {str(error).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------------
# Sizes

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def parse_memory_size(text: str) -> int:
    """Bytes in ``24GiB``, ``24576MiB``, ``80G`` (binary, as in ``free -g``) or ``24GB`` (decimal, 10^9)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(
            f"memory size {text!r}: expected a positive number and a unit, e.g. 24GiB, 24576MiB, 80G or 24GB"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: unknown unit {match.group(2)!r}; use GiB, MiB, TiB, G, M, GB or MB")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory size {text!r} must be larger than zero")
    return size


def format_gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"
