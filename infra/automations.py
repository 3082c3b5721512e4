"""Create (or replace) the Prefect automation that marks unresponsive flow runs Crashed.

A worker host that dies mid-training leaves its flow run "Running" forever: nothing reports its end.
With PREFECT_FLOWS_HEARTBEAT_FREQUENCY set on the workers (infra sets 60 s), every flow run emits
heartbeat events; this automation crashes a run whose heartbeats stop for three intervals. The
retrain run waiting on a crashed training run then fails with the crash, and rerunning it resumes
from the last checkpoint.

    PREFECT_API_URL=http://127.0.0.1:4200/api python infra/automations.py [--heartbeat-seconds 60]
"""

from __future__ import annotations

import argparse
from datetime import timedelta

NAME = "loraops: crash flow runs whose heartbeats stopped"
FLOW_RUN_ENDS = ("Completed", "Failed", "Cancelled", "Crashed")


def zombie_automation(heartbeat_seconds: int):
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    silence = timedelta(seconds=3 * heartbeat_seconds)
    return Automation(
        name=NAME,
        description=f"A flow run without a heartbeat or an end for {silence.seconds} s lost its worker.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{end}" for end in FLOW_RUN_ENDS)},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silence,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silence.seconds} s: the worker stopped; rerun to resume from the last checkpoint",
            )
        ],
    )


def ensure_zombie_automation(heartbeat_seconds: int = 60):
    """Replace any earlier version of the automation, so rerunning the script is safe."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(NAME):
            client.delete_automation(existing.id)
    return zombie_automation(heartbeat_seconds).create()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heartbeat-seconds", type=int, default=60, help="PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers"
    )
    args = parser.parse_args()
    automation = ensure_zombie_automation(args.heartbeat_seconds)
    print(f"automation '{automation.name}' ready ({automation.id})")


if __name__ == "__main__":
    main()
