"""Padding share of the project's own training data, padded vs padding-free vs packed rows.

    .venv/bin/python bench/padding_report.py            # params.yaml, data/, models/base (prepare it first)

Tokenises the train split exactly as training does (``loraops.train.datasets.tokenized_splits``: chat
template, final-assistant-turn labels, ``data.max_length``) and reports, at ``train.batch_size``, the
share of pad tokens in padded batches (random order, seed ``train.seed``), in padding-free batches
(none), and in best-fit-decreasing rows of ``data.max_length`` tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from loraops.project.params_file import load_config
    from loraops.train.datasets import tokenized_splits
    from loraops.train.packing import padding_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    train, _ = tokenized_splits(cfg, args.params.resolve().parent)
    lengths = [len(ids) for ids in train["input_ids"]]
    batch_size = args.batch_size or cfg.train.batch_size
    report = padding_report(lengths, batch_size, cfg.data.max_length, seed=cfg.train.seed)
    print(json.dumps(report.as_dict(), indent=2))
    print(
        f"\n| batches of {batch_size} ({report.examples} examples, {report.tokens:,} tokens) | pad share |\n|---|---:|\n"
        f"| padded to the longest in the batch | {report.padded_share:.1%} |\n"
        f"| padding-free (loraops default) | {report.padding_free_share:.1%} |\n"
        f"| packed into rows of {report.bin_capacity} (best-fit decreasing, padded) | {report.packed_share:.1%} "
        f"({report.packed_bins} rows) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
