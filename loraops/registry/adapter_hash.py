"""The key of an adapter: one sha256 over the files that determine it (config and weights).

Registration is keyed on it (tag ``loraops.adapter_key``), so the same adapter is one model version
however often, and after whatever crash, it is registered. Tokenizer files, timings and run ids
do not enter it. It is derived from ``integrity.adapter_digests``, the one pass that hashes the folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from loraops.registry.integrity import adapter_digests

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CONFIG = "adapter_config.json"


def _determines_adapter(name: str) -> bool:
    """A top-level ``adapter_config.json`` or weight file (files in subfolders do not determine the adapter)."""
    return "/" not in name and (name == _CONFIG or PurePosixPath(name).suffix in _WEIGHT_SUFFIXES)


def key_of_digests(digests: Mapping[str, str]) -> str | None:
    """sha256 over (name, sha256 of content) of each file that determines the adapter; None without any."""
    names = sorted(name for name in digests if _determines_adapter(name))
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + digests[name].encode() + b"\n")
    return digest.hexdigest()


def adapter_key(adapter_dir: str | Path) -> str:
    """The key of the adapter saved in ``adapter_dir`` (same config and weight bytes, same key)."""
    key = key_of_digests(adapter_digests(adapter_dir) if Path(adapter_dir).is_dir() else {})
    if key is None:
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json or weight files (*.safetensors, *.bin)")
    return key
