"""CI: check what `make demo` must leave behind. Usage: check_demo.py DEMO_LOG [PARAMS]

The demo must print the baseline and adapter losses, the gate decision and the registered version,
and the MLflow registry must hold that version with an alias and its lineage tags, the losses on the
tags equal to the printed ones. Exit 1 with every missing item listed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from loraops.names import BASELINE_LOSS_TAG, GATE_TAG, LINEAGE_TAGS, VAL_LOSS_TAG
from loraops.project.params_file import load_config
from loraops.registry.store import make_client, resolve_tracking_uri


def main(log_path: str, params: str = "params.yaml") -> int:
    log = Path(log_path).read_text()
    problems: list[str] = []
    baseline = re.search(r"^baseline validation loss: ([0-9.]+)", log, re.M)
    adapter = re.search(r"^adapter\s+validation loss: ([0-9.]+)", log, re.M)
    registered = re.search(r"^registry: (\S+) version (\d+) \[(@[^\]]+)\]", log, re.M)
    for label, match in (("baseline loss", baseline), ("adapter loss", adapter), ("registered version", registered)):
        if not match:
            problems.append(f"the demo printed no {label}")
    if not re.search(r"^gate: PASSED", log, re.M):
        problems.append("the demo's gate did not pass")
    if registered:
        cfg = load_config(params)
        client = make_client(resolve_tracking_uri(cfg.registry, Path(params).resolve().parent))
        name, number = registered.group(1), registered.group(2)
        version = client.get_model_version(name, number)
        if not version.aliases:
            problems.append(f"{name} version {number} has no alias")
        missing = [tag for tag in (*LINEAGE_TAGS, GATE_TAG) if not version.tags.get(tag)]
        if missing:
            problems.append(f"{name} version {number} lacks tags {missing}")
        for label, tag, printed in (("baseline", BASELINE_LOSS_TAG, baseline), ("adapter", VAL_LOSS_TAG, adapter)):
            if printed and tag in version.tags and abs(float(version.tags[tag]) - float(printed.group(1))) > 5e-5:
                problems.append(f"{label} loss printed {printed.group(1)} but tagged {version.tags[tag]}")
        if baseline and adapter and float(adapter.group(1)) >= float(baseline.group(1)):
            problems.append("the adapter's validation loss is not below the baseline's")
        print(f"demo registered {name} version {number} aliases={version.aliases}")
    for problem in problems:
        print(f"demo check failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
