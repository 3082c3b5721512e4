"""Prefect glue around a flow run: the form's defaults, loraops' log lines in the run, the final state.

The work stays in loraops; these helpers only read or set things on the run itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect.context import FlowRunContext
from prefect.states import Completed, State

from loraops.config import LoraopsConfig
from loraops.project.run_config import resolve_run_config
from loraops.results import GateDecision, Registration

REGISTERED_TAG, REFUSED_TAG, UNCHANGED_TAG = "registered", "refused", "unchanged"
P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def loraops_logs_in_run(logger_name: str = "loraops") -> Iterator[None]:
    """Send the ``loraops`` stdlib logger's lines (stages, training steps, gate reasons) to the run's logs,
    secret-looking values redacted.

    A worker's flow-run process imports Prefect before any loraops module, so
    ``PREFECT_LOGGING_EXTRA_LOGGERS`` set from the package comes too late there; attaching Prefect's API
    handler for the run's duration works for workers, deployments and ``loraops retrain`` alike. Only the
    API handler is added (the console keeps what it had), and none when one is already attached.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(logger_name)
    added = None if any(isinstance(h, APILogHandler) for h in logger.handlers) else APILogHandler()
    level = logger.level
    if added:
        logger.addHandler(added)
    api_handlers = [handler for handler in logger.handlers if isinstance(handler, APILogHandler)]
    redacting = _RedactSecrets()  # on the handlers: a logger's own filters skip its children's lines
    for handler in api_handlers:
        handler.addFilter(redacting)
    if logger.getEffectiveLevel() > logging.INFO:  # Prefect's root logger is at WARNING in a worker's process
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in api_handlers:
            handler.removeFilter(redacting)
        if added:
            logger.removeHandler(added)


class _RedactSecrets(logging.Filter):
    """Secret-looking values in a log line (e.g. an override echoed back) become ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        from loraops.registry.values import redact_secret_values

        message = record.getMessage()
        redacted = redact_secret_values(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def with_loraops_logs(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate a flow function (under ``@flow``) to run it inside ``loraops_logs_in_run``."""

    @functools.wraps(function)  # keeps the signature: the flow's parameters and form are unchanged
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with loraops_logs_in_run():
            return function(*args, **kwargs)

    return run


def run_config(config: LoraopsConfig | None, root: Path) -> LoraopsConfig:
    """params.yaml with the values this run chose (see loraops.project.run_config): for a deployment run, a
    field counts as chosen when it differs from what the deployment's form pre-filled."""
    hide_secret_parameters()
    return resolve_run_config(config, root, _form_prefill())


def hide_secret_parameters() -> None:
    """Rewrite the flow run's stored parameters with secret-looking values (the contract's secret patterns)
    replaced by ``***``, so the Prefect UI and API do not keep them; the run itself has the real values."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    from prefect.client.orchestration import get_client

    from loraops.registry.values import redact_nested

    stored = context.flow.serialize_parameters(context.parameters)
    redacted = redact_nested(stored)
    if redacted != stored:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, parameters=redacted)
        logging.getLogger("loraops.run").warning("secret-looking values in this run's parameters stored as ***")


def _form_prefill() -> dict[str, Any] | None:
    """The ``config`` the deployment's form showed (its default; the code's defaults without one); None
    when the run does not come from a deployment."""
    context = FlowRunContext.get()
    deployment_id = context.flow_run.deployment_id if context and context.flow_run else None
    if deployment_id is None:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        defaults = client.read_deployment(deployment_id).parameters or {}
    return defaults.get("config") or LoraopsConfig().model_dump(mode="json")


def outcome(decision: GateDecision, registration: Registration) -> tuple[str, str, str]:
    """(state name, state message, flow-run tag) that tell a registered run from a refused one."""
    if registration.version is not None:
        aliases = "".join(f" @{alias}" for alias in registration.aliases)
        return "Completed", f"registered {registration.model_name} v{registration.version}{aliases}", REGISTERED_TAG
    reasons = "; ".join(reason for reason in decision.reasons) or "no reason recorded"
    return "Refused", f"gate refused: {reasons}", REFUSED_TAG


def final_state(result: Any, decision: GateDecision, registration: Registration) -> State:
    """A Completed state named and described by the outcome, with ``result`` as its data; tags the run."""
    name, message, tag = outcome(decision, registration)
    _tag_run(tag)
    logging.getLogger("loraops.outcome").info(message)
    return Completed(name=name, message=message, data=result)


def _tag_run(tag: str) -> None:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            tags = client.read_flow_run(context.flow_run.id).tags
            if tag not in tags:
                client.update_flow_run(context.flow_run.id, tags=[*tags, tag])
    except Exception as error:  # the outcome is already recorded in MLflow: a missing tag must not fail the run
        logging.getLogger("loraops.outcome").warning("could not tag the flow run '%s': %s", tag, error)


def unchanged_state(freshness: Any) -> State:
    """An early end: Completed, 'nothing changed since version N', tagged ``unchanged``; nothing trained."""
    _tag_run(UNCHANGED_TAG)
    logging.getLogger("loraops.outcome").info(freshness.message)
    return Completed(message=freshness.message, data=freshness)
