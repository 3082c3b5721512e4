"""What changed in the data since the champion trained: rows added, removed and changed, with examples.

Rows are matched by their first user turn (the question; the whole text for plain-text data), so an
edited answer counts as "changed", not as one removal plus one addition. The champion's data is read
from the local DVC cache by the md5 its version records (``dvc update`` keeps the previous version there).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from loraops.config import LoraopsConfig

log = logging.getLogger(__name__)

EXAMPLES = 3  # examples shown per kind of change


class SplitDiff(BaseModel):
    split: str
    added: int
    removed: int
    changed: int
    examples: dict[str, list[str]]  # "added"/"removed"/"changed" -> a few questions


class DataDiff(BaseModel):
    against: str  # e.g. "champion v1 (data 1a2b...)"
    old_md5: str | None
    new_md5: str
    splits: list[SplitDiff] = []
    note: str | None = None  # why there is no diff (no champion, its data not in the cache)

    def markdown(self) -> str:
        lines = [f"## Data diff against {self.against}", "", f"data md5 {self.old_md5} → {self.new_md5}", ""]
        if self.note:
            return "\n".join([*lines, self.note])
        lines += ["| split | added | removed | changed |", "|---|---|---|---|"]
        lines += [f"| {s.split} | {s.added} | {s.removed} | {s.changed} |" for s in self.splits]
        for split in self.splits:
            for kind, questions in split.examples.items():
                lines += (
                    [f"- {split.split} {kind}: " + "; ".join(f"`{q[:80]}`" for q in questions)] if questions else []
                )
        return "\n".join(lines)


def _rows_by_question(path: Path, fmt: str) -> dict[str, set[str]]:
    from loraops.data.formats import normalize_row
    from loraops.data.keys import dedup_key, question_key
    from loraops.data.reader import load_split

    if not path.is_file():
        return {}
    loaded = load_split(path, fmt)
    rows: dict[str, set[str]] = {}
    for row in loaded.rows:
        example = normalize_row(row, loaded.format)
        rows.setdefault(question_key(example) or dedup_key(example), set()).add(dedup_key(example))
    return rows


def diff_split(split: str, old: Path, new: Path, fmt: str) -> SplitDiff:
    """Rows of ``new`` added, removed and changed relative to ``old`` (same split, two data versions)."""
    before, after = _rows_by_question(old, fmt), _rows_by_question(new, fmt)
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(key for key in before.keys() & after.keys() if before[key] != after[key])
    return SplitDiff(
        split=split,
        added=len(added),
        removed=len(removed),
        changed=len(changed),
        examples={"added": added[:EXAMPLES], "removed": removed[:EXAMPLES], "changed": changed[:EXAMPLES]},
    )


def checkout_from_cache(root: Path, md5: str, destination: Path) -> bool:
    """Copy the data directory DVC cached under ``md5`` (a ``.dir`` hash) to ``destination``; False if not cached."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    with Repo(str(root)) as repo:
        odb = repo.cache.local
        if not odb.exists(md5):
            return False
        for key, _, info in Tree.load(odb, HashInfo("md5", md5)):
            target = destination.joinpath(*key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(odb.oid_to_path(info.value), target)
    return True


def diff_against(cfg: LoraopsConfig, root: Path, old_md5: str | None, against: str) -> DataDiff:
    """The data in the workspace against the data version ``old_md5`` (read from the DVC cache)."""
    from loraops.lineage.versioning import data_md5

    new_md5 = data_md5(root)
    diff = DataDiff(against=against, old_md5=old_md5, new_md5=new_md5)
    if old_md5 is None:
        return diff.model_copy(update={"note": "no earlier data to compare with: every row is new"})
    data_dir = root / "data"
    with tempfile.TemporaryDirectory() as scratch:
        if not checkout_from_cache(root, old_md5, Path(scratch)):
            return diff.model_copy(
                update={"note": f"data {old_md5} is not in the local DVC cache: `dvc fetch` it to diff"}
            )
        splits = [
            diff_split(name, Path(scratch) / Path(file).relative_to("data"), root / file, cfg.data.format)
            for name, file in (("train", cfg.data.train_file), ("validation", cfg.data.validation_file))
            if Path(file).parts[:1] == (data_dir.name,)
        ]
    return diff.model_copy(update={"splits": splits})


def write_diff(diff: DataDiff, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(diff.model_dump(mode="json"), indent=2) + "\n")
    return path
