"""The zombie-run automation on a real (test) Prefect server: created once, replaced on rerun."""

from __future__ import annotations

import importlib.util
from datetime import timedelta

from conftest import REPO_ROOT


def _automations_module():
    spec = importlib.util.spec_from_file_location("infra_automations", REPO_ROOT / "infra" / "automations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unresponsive_flow_runs_are_crashed_after_three_missed_heartbeats(prefect_harness):
    from prefect.client.orchestration import get_client

    automations = _automations_module()
    automations.ensure_zombie_automation(heartbeat_seconds=60)
    automations.ensure_zombie_automation(heartbeat_seconds=45)  # rerunning replaces, never duplicates
    with get_client(sync_client=True) as client:
        (stored,) = client.read_automations_by_name(automations.NAME)
    trigger = stored.trigger
    assert trigger.posture == "Proactive" and trigger.threshold == 1
    assert trigger.within == timedelta(seconds=135)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    (action,) = stored.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    assert "rerun to resume from the last checkpoint" in action.message
