"""Model ids of ``loraops serve``, resolved against the MLflow registry: the base, ``NAME@alias``, ``NAME/VERSION``.

An id is only ever looked up in the registry (or compared with the served base's id): nothing a client
sends is read as a file path. ``NAME@alias`` resolutions are reused for ``serve.alias_ttl_s`` and then
asked again, so a moved, added or deleted alias takes effect within that time without a restart;
every change of what an alias serves is logged. Versions are re-read on the same schedule (a deleted
version is refused within the TTL too).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException

from loraops.names import ADAPTER_KEY_TAG, BASE_MODEL_TAG, BASE_REVISION_TAG
from loraops.registry.versions import get_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

_ADAPTER_ID = re.compile(r"^(?P<name>[^/@\s]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class UnknownModel(LookupError):
    """No model, alias or version of that id: the client's request names nothing servable (404)."""


class ModelRefused(ValueError):
    """The version exists but cannot run on the served base (400): trained on another base or quantisation."""


@dataclass(frozen=True)
class Target:
    """What a request runs on: the base model alone (``version`` None) or one registered version on it."""

    model_id: str  # the exact thing answered from: the base's id, or NAME/VERSION
    version: ModelVersion | None = None

    @property
    def fingerprint(self) -> str:
        """The adapter's content key (``loraops.adapter_key``) when recorded, else the exact id."""
        key = (self.version.tags.get(ADAPTER_KEY_TAG) if self.version else None) or ""
        return f"lora-{key[:16]}" if key else self.model_id


def base_model_mismatch(version: ModelVersion, base_id: str, base_revision: str | None) -> str | None:
    """Why ``version`` cannot run on the served base, or None when it was trained on it."""
    trained_on = version.tags.get(BASE_MODEL_TAG) or "(unknown: no loraops.base_model tag)"
    trained_revision = version.tags.get(BASE_REVISION_TAG) or None
    if trained_on == base_id and trained_revision == (base_revision or None):
        return None
    at = lambda source, revision: f"{source!r}" + (f" at revision {revision}" if revision else "")  # noqa: E731
    return (
        f"{version.name}/{version.version} was trained on base model {at(trained_on, trained_revision)}, but this "
        f"server serves {at(base_id, base_revision)}: an adapter only runs on the base it was trained on. "
        f"Serve it from a project whose model.base is {trained_on!r}"
    )


class ModelResolver:
    """Turns request model ids into registry versions, following aliases with a time-to-live."""

    def __init__(
        self,
        client: MlflowClient,
        base_id: str,
        base_revision: str | None,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.base_id = base_id
        self.base_revision = base_revision
        self.ttl_s = ttl_s
        self.clock = clock
        self.registry_lock = threading.RLock()  # MLflow's client and its global URIs: one caller at a time
        self._cache: dict[tuple[str, str], tuple[float, ModelVersion]] = {}
        self._served: dict[tuple[str, str], str] = {}  # (name, alias) -> version it last resolved to
        self._started = int(time.time())

    def resolve(self, model_id: str) -> Target:
        """The target of ``model_id``; UnknownModel (404) or ModelRefused (400) with a message for the client."""
        if model_id == self.base_id:
            return Target(model_id=self.base_id)
        match = _ADAPTER_ID.match(model_id)
        if match is None:
            raise UnknownModel(
                f"the model {model_id!r} does not exist: use the base {self.base_id!r}, NAME@ALIAS or NAME/VERSION "
                "of a registered model (GET /v1/models lists them)"
            )
        name, wanted = match["name"], match["alias"] or match["version"]
        version = self._version(name, wanted)
        problem = base_model_mismatch(version, self.base_id, self.base_revision)
        if problem:
            raise ModelRefused(problem)
        return Target(model_id=f"{version.name}/{version.version}", version=version)

    def _version(self, name: str, wanted: str) -> ModelVersion:
        key = (name, wanted)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        with self.registry_lock:
            try:
                version = get_version(self.client, name, wanted)
            except LookupError:
                self._cache.pop(key, None)
                if self._served.pop(key, None) is not None:
                    logger.info("%s@%s no longer exists: refused from now on", name, wanted)
                what = f"version {wanted}" if wanted.isdigit() else f"alias {wanted!r}"
                raise UnknownModel(f"the registered model {name!r} has no {what} (GET /v1/models lists them)") from None
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise UnknownModel(f"the registered model {name!r} does not exist") from None
        self._cache[key] = (now + self.ttl_s, version)
        if not wanted.isdigit():
            self._note_alias(name, wanted, str(version.version))
        return version

    def _note_alias(self, name: str, alias: str, version: str) -> None:
        before = self._served.get((name, alias))
        if before != version:
            self._served[(name, alias)] = version
            was = f" (was version {before})" if before else ""
            logger.info("%s@%s -> version %s%s", name, alias, version, was)

    def model_ids(self) -> list[tuple[str, int]]:
        """(id, created unix time) of the base, then of every alias and version of every registered model."""
        listed = [(self.base_id, self._started)]
        with self.registry_lock:
            for model in _pages(lambda token: self.client.search_registered_models(page_token=token)):
                created = int((model.creation_timestamp or 0) / 1000)
                listed += [(f"{model.name}@{alias}", created) for alias in sorted(model.aliases or {})]
                versions = _pages(
                    lambda token, name=model.name: self.client.search_model_versions(
                        f"name = '{_quoted(name)}'", page_token=token
                    )
                )
                by_number = sorted(versions, key=lambda v: int(v.version))
                listed += [(f"{v.name}/{v.version}", int((v.creation_timestamp or 0) / 1000)) for v in by_number]
        return listed


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")


def _pages(search: Callable[[str | None], list]) -> Iterator:
    token = None
    while True:
        page = search(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return
