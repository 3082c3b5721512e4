"""One base model in memory, registry adapters switched on it per request, at most ``serve.max_adapters`` kept.

Adapters are fetched from the registry with their content hashes verified (``integrity.download_verified``,
the one fetch every load path uses) and safetensors only; an adapter trained with other 4-bit settings
than the served base is refused. Generation is serialised: one lock covers loading an adapter,
``set_adapter`` and ``generate``, so concurrent requests for different adapters never mix. Fetching a
new adapter (a download) happens before taking the lock, so it does not hold up other requests.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loraops.config import QuantConfig
from loraops.registry import integrity
from loraops.registry.fetch import quant_of_run
from loraops.serve.generation import Outcome, Sampling, generate_answer
from loraops.serve.models import ModelRefused, ModelResolver, Target
from loraops.train.adapters import require_safetensors_adapter

logger = logging.getLogger(__name__)


class AdapterPool:
    """The base model with up to ``max_adapters`` adapters on it (peft multi-adapter), least recently used dropped.

    Not thread-safe by itself: the engine calls it under its lock.
    """

    def __init__(self, base_model, max_adapters: int):
        self.model = base_model  # a PeftModel once the first adapter is loaded
        self.max_adapters = max_adapters
        self._names: OrderedDict[str, str] = OrderedDict()  # model id (NAME/3) -> peft adapter name, oldest first
        self._count = 0

    def loaded(self) -> list[str]:
        """Model ids of the loaded adapters, least recently used first."""
        return list(self._names)

    def has(self, model_id: str) -> bool:
        return model_id in self._names

    def add(self, model_id: str, adapter_dir: Path) -> None:
        """Load the adapter in ``adapter_dir`` as ``model_id``; drop the least recently used one beyond the limit."""
        from peft import PeftModel

        self._count += 1
        name = f"adapter{self._count}"  # peft names cannot hold '.' or '/'; registry names can
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name, is_trainable=False)
            self.model.eval()
        self._names[model_id] = name
        logger.info("loaded adapter %s (%d of at most %d)", model_id, len(self._names), self.max_adapters)
        while len(self._names) > self.max_adapters:
            dropped, dropped_name = self._names.popitem(last=False)
            self.model.delete_adapter(dropped_name)
            logger.info("dropped adapter %s (least recently used; serve.max_adapters=%d)", dropped, self.max_adapters)

    @contextmanager
    def active(self, model_id: str | None) -> Iterator:
        """The model with ``model_id``'s adapter active, or with none (the base) for None."""
        from peft import PeftModel

        if model_id is None:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        self._names.move_to_end(model_id)
        self.model.set_adapter(self._names[model_id])
        yield self.model


@dataclass
class Job:
    """One chat request, resolved: its target, messages and settings, and the adapter fetched for it (if any)."""

    target: Target
    messages: Sequence[Mapping[str, str]]
    sampling: Sampling
    scratch: tempfile.TemporaryDirectory | None = None
    adapter_dir: Path | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None


class ServingEngine:
    """Resolves model ids, fetches and verifies adapters, and generates one request at a time."""

    def __init__(self, resolver: ModelResolver, pool: AdapterPool, tokenizer, quant: QuantConfig):
        self.resolver = resolver
        self.pool = pool
        self.tokenizer = tokenizer
        self.quant = quant
        self.lock = threading.Lock()

    @property
    def base_id(self) -> str:
        return self.resolver.base_id

    def prepare(self, model_id: str, messages: Sequence[Mapping[str, str]], sampling: Sampling) -> Job:
        """Resolve ``model_id`` and fetch its adapter unless loaded; raises before any answer is started."""
        job = Job(self.resolver.resolve(model_id), messages, sampling)
        if job.target.version is not None and not self.pool.has(job.target.model_id):
            try:
                self._fetch(job)
            except BaseException:
                job.close()
                raise
        return job

    def run(self, job: Job, emit: Callable[[str], None]) -> Outcome:
        """Answer ``job``, emitting text deltas; the adapter switch and generation hold the engine's lock."""
        try:
            with self.lock:
                model_id = job.target.model_id if job.target.version is not None else None
                if model_id is not None and not self.pool.has(model_id):
                    if job.adapter_dir is None:  # dropped by other requests since prepare(): fetch it again
                        self._fetch(job)
                    self.pool.add(model_id, job.adapter_dir)
                with self.pool.active(model_id) as model:
                    return generate_answer(model, self.tokenizer, job.messages, job.sampling, emit, job.cancelled)
        finally:
            job.close()

    def complete(self, job: Job) -> tuple[str, Outcome]:
        """The whole answer: the concatenation of the deltas a stream would send."""
        parts: list[str] = []
        outcome = self.run(job, parts.append)
        return "".join(parts), outcome

    def _fetch(self, job: Job) -> None:
        version = job.target.version
        job.scratch = tempfile.TemporaryDirectory(prefix="loraops-serve-")
        with self.resolver.registry_lock:
            client = self.resolver.client
            trained = quant_of_run(client, version.run_id, QuantConfig())
            if trained.mode != self.quant.mode:
                raise ModelRefused(
                    f"{job.target.model_id} was trained on a base loaded with quant.mode={trained.mode}, but this "
                    f"server loads its base with quant.mode={self.quant.mode}: serve it from a project with "
                    f"quant.mode: {trained.mode}"
                )
            folder = integrity.download_verified(client, version, Path(job.scratch.name))
        require_safetensors_adapter(folder)
        job.adapter_dir = folder
