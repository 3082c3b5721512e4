"""The key of an adapter: one sha256 over the files that determine it (config and weights).

Registration is keyed on it (tag ``loraops.adapter_key``), so the same adapter is one model version
however often, and after whatever crash, it is registered. Tokenizer files, timings and run ids
do not enter it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraops.registry.integrity import file_sha256

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CONFIG = "adapter_config.json"


def adapter_files(adapter_dir: str | Path) -> list[Path]:
    """``adapter_config.json`` and the weight files of a PEFT adapter folder, in a stable order."""
    folder = Path(adapter_dir)
    files = (
        [path for path in folder.iterdir() if path.is_file() and _determines_adapter(path)] if folder.is_dir() else []
    )
    return sorted(files, key=lambda path: path.name)


def _determines_adapter(path: Path) -> bool:
    return path.name == _CONFIG or path.suffix in _WEIGHT_SUFFIXES


def adapter_key(adapter_dir: str | Path) -> str:
    """sha256 over (name, sha256 of content) of each file that determines the adapter."""
    files = adapter_files(adapter_dir)
    if not files:
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json or weight files (*.safetensors, *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()
