"""params.yaml, the file DVC tracks: read it with -S overrides into the typed config, write a run's values back.

Values are set without reformatting the file: comments, key order, quoting and ``null`` stay.
ruamel.yaml round-trips comments and order but writes every ``null`` as an empty value and may
re-indent what it did not change. So the file is dumped twice, before and after the change, and
only the lines that differ between those two dumps are replaced in the original text.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from loraops.config import ConfigError, LoraopsConfig, config_from_dict
from loraops.names import PARAMS_FILE

log = logging.getLogger(__name__)

_EXPLICIT_NULL = re.compile(r":\s+(null|~)\s*(#.*)?$", re.MULTILINE)


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameters file not found; run from the project root or pass --params PATH")
    if not path.is_file():
        raise ConfigError(f"{path}: is a directory, not a parameters file; pass --params PATH to the YAML file")
    restore = f"restore it with `git checkout {path.name}` or pass --params PATH"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file (invalid UTF-8 at byte {error.start}); {restore}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror}); {restore}") from None
    if raw is None:
        raise ConfigError(f"{path}: is empty (or holds only comments); {restore}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, lora, ...), got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` (the value as YAML, so numbers and booleans keep their type)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected section.key=value, e.g. lora.r=8")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted keys (``lora.r``) set; unknown keys are caught at validation."""
    merged = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
            node = child
        node[leaf] = value
    return merged


def load_config(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> LoraopsConfig:
    raw = apply_overrides(read_params(path), overrides or {})
    return config_from_dict(raw, source=str(path))


def write_params(config: LoraopsConfig, path: str | Path = PARAMS_FILE) -> bool:
    """Write the values of ``config`` that differ from ``path`` into it, changing only their lines.

    A run with overrides records them in params.yaml (as ``dvc exp run -S`` does) so that dvc.lock
    and the registered lineage describe what actually ran. Comments, key order and ``null`` stay, and a
    setting the file leaves to its default is not added: only values this run chose are written.
    """
    path = Path(path)
    wanted = flatten(config.model_dump(mode="json"))
    if not path.exists():
        path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return True
    raw = read_params(path)
    try:
        recorded = flatten(config_from_dict(raw, source=str(path)).model_dump(mode="json"))
    except ConfigError:
        recorded = flatten(raw)
    missing = object()
    return set_values(path, {key: value for key, value in wanted.items() if recorded.get(key, missing) != value})


@contextmanager
def params_restored_on_failure(root: Path) -> Iterator[None]:
    """A run that fails leaves params.yaml as it found it, so its -S overrides don't leak into later runs.

    Once the run has recorded dvc.lock (``version_outputs``), params.yaml stays: the lock describes it.
    """
    params, lock = Path(root) / "params.yaml", Path(root) / "dvc.lock"
    before = params.read_bytes() if params.is_file() else None
    lock_before = lock.read_bytes() if lock.is_file() else None
    try:
        yield
    except BaseException:
        now = params.read_bytes() if params.is_file() else None
        if before is None or now == before:
            raise
        if (lock.read_bytes() if lock.is_file() else None) == lock_before:
            params.write_bytes(before)
            log.warning("run failed: params.yaml restored to what it was before the run (its overrides dropped)")
        else:
            log.warning(
                "run failed after dvc.lock recorded its settings: params.yaml keeps them; "
                "`git checkout params.yaml dvc.lock` restores both"
            )
        raise


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``; lists and empty mappings are leaves."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def set_values(path: Path, values: dict[str, Any]) -> bool:
    """Set dotted keys (``train.max_steps``) in the YAML file at ``path``; return whether it changed."""
    original = path.read_text(encoding="utf-8")
    round_trip = _round_trip(null_as_word=bool(_EXPLICIT_NULL.search(original)))
    document = round_trip.load(original)
    before = _dump(round_trip, document)
    changed = False
    for dotted, value in values.items():
        changed |= _set(document, dotted, value)
    if changed:
        path.write_text(_patch(original, before, _dump(round_trip, document)), encoding="utf-8")
    return changed


def _round_trip(null_as_word: bool):
    from ruamel.yaml import YAML

    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # never fold a long value onto a second line
    if null_as_word:  # a file that spells null keeps spelling it
        round_trip.representer.add_representer(
            type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
        )
    return round_trip


def _dump(round_trip, document) -> str:
    stream = io.StringIO()
    round_trip.dump(document, stream)
    return stream.getvalue()


def _set(document, dotted: str, value: Any) -> bool:
    from ruamel.yaml.comments import CommentedMap

    node = document
    *parents, leaf = dotted.split(".")
    for part in parents:
        if part not in node or not isinstance(node[part], dict):
            node[part] = CommentedMap()
        node = node[part]
    if leaf in node and node[leaf] == value and isinstance(node[leaf], bool) == isinstance(value, bool):
        return False
    node[leaf] = value
    return True


def _patch(original: str, before: str, after: str) -> str:
    """Apply the edit ``before -> after`` to ``original``, line by line where the two dumps align."""
    lines, old, new = (
        original.splitlines(keepends=True),
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
    )
    if len(lines) != len(old):  # ruamel could not keep the line structure: take its whole dump
        return after
    patched = list(lines)
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag != "equal":
            patched[i1:i2] = new[j1:j2]
    return "".join(patched)
