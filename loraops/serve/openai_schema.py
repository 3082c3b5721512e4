"""The OpenAI chat-completions wire format that ``loraops serve`` speaks: requests, responses, stream chunks, errors.

Requests are validated here (unknown fields are ignored, as OpenAI-compatible servers do); errors
are OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraops.serve.generation import Outcome, Sampling

MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error answered to the client as OpenAI does."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_chat(self) -> dict[str, str]:
        """The message as the chat template takes it (OpenAI's ``developer`` role is a system message)."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: the fields loraops serves (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # loraops' default is greedy (OpenAI's is 1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[Message]) -> list[Message]:
        if not messages:
            raise ValueError("messages is empty: send at least one message")
        return messages

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stop

    def sampling(self, limit: int) -> Sampling:
        """The generation settings, ``max_tokens`` checked against the server's ``serve.max_tokens``."""
        wanted = self.max_completion_tokens or self.max_tokens
        if wanted is not None and wanted > limit:
            param = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise ApiError(
                400, f"{param}={wanted} is above this server's limit of {limit} (serve.max_tokens)", param=param
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(wanted or limit, self.temperature, self.top_p, stop, self.seed)


class Completion:
    """Ids and timestamps shared by one answer's response or stream chunks."""

    def __init__(self, model: str, fingerprint: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.fingerprint = model, fingerprint

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def response(self, text: str, outcome: Outcome) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": outcome.finish_reason,
            "logprobs": None,
        }
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage(outcome)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse({**self._envelope("chat.completion.chunk"), "choices": [choice]})

    def usage_chunk(self, outcome: Outcome) -> str:
        return sse({**self._envelope("chat.completion.chunk"), "choices": [], "usage": usage(outcome)})


def usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event as OpenAI sends it: ``data: <json>`` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


DONE = sse("[DONE]")
