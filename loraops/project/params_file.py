"""Set values in params.yaml without reformatting it: comments, key order, quoting and ``null`` stay.

ruamel.yaml round-trips comments and order but writes every ``null`` as an empty value and may
re-indent what it did not change. So the file is dumped twice, before and after the change, and
only the lines that differ between those two dumps are replaced in the original text.
"""

from __future__ import annotations

import difflib
import io
import re
from pathlib import Path
from typing import Any

_EXPLICIT_NULL = re.compile(r":\s+(null|~)\s*(#.*)?$", re.MULTILINE)


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
