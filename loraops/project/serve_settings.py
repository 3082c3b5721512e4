"""The ``serve`` section of params.yaml: where ``loraops serve`` listens and what it keeps in memory.

Its own module because config.py is at its size limit; ``LoraopsConfig.serve`` uses it. No API key
here: a key is a secret and comes from ``--api-key`` or ``LORAOPS_API_KEY``, never from params.yaml.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """`loraops serve`: an OpenAI-compatible server of the base model and the registry's adapters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    host: str = Field("127.0.0.1", min_length=1, description="Interface to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    max_adapters: int = Field(
        4, ge=1, description="Adapters kept loaded on the one base model; the least recently used is dropped"
    )
    alias_ttl_s: float = Field(
        10.0,
        ge=0,
        description="Seconds a NAME@alias -> version resolution is reused; after that the registry is asked "
        "again, so a moved, added or deleted alias takes effect within this time, without a restart",
    )
    max_tokens: int = Field(
        256, ge=1, description="Most tokens a request may generate (its default too); more is refused with 400"
    )
