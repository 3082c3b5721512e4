"""The HTTP face of ``loraops serve``: an OpenAI-compatible FastAPI app over a ``ServingEngine``.

``GET /health``; ``GET /v1/models`` (and ``/v1/models/{id}``); ``POST /v1/chat/completions``, whole or
streamed as server-sent events ending with ``data: [DONE]``. Blocking work (registry look-ups,
downloads, generation) runs in worker threads, never on the event loop. With an API key every
``/v1`` route wants ``Authorization: Bearer <key>``; ``/health`` stays open for probes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from loraops.registry.integrity import AdapterIntegrityError
from loraops.serve.engine import Job, ServingEngine
from loraops.serve.models import ModelRefused, UnknownModel
from loraops.serve.openai_schema import DONE, ApiError, ChatRequest, Completion, error_body, sse
from loraops.train.adapters import UnsafeArtifactError

logger = logging.getLogger(__name__)


def create_app(engine: ServingEngine, max_tokens: int, api_key: str | None = None) -> FastAPI:
    """The app serving ``engine``; ``max_tokens`` is the most one request may ask for (``serve.max_tokens``)."""
    app = FastAPI(title="loraops serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    def authorized(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base_model": engine.base_id}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(i, c) for i, c in engine.resolver.model_ids()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    def get_model(model_id: str) -> dict[str, Any]:
        for listed, created in engine.resolver.model_ids():
            if listed == model_id:
                return _model_card(listed, created)
        raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest):
        sampling = body.sampling(max_tokens)
        messages = [message.as_chat() for message in body.messages]
        job = await run_in_threadpool(_prepare, engine, body.model, messages, sampling)
        completion = Completion(job.target.model_id, job.target.fingerprint)
        if not body.stream:
            text, outcome = await run_in_threadpool(engine.complete, job)
            return completion.response(text, outcome)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, job, completion, include_usage), media_type="text/event-stream")

    return app


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loraops"}


def _prepare(engine: ServingEngine, model_id: str, messages, sampling) -> Job:
    """Resolve and fetch, turning refusals into the client's errors (before any answer starts)."""
    try:
        return engine.prepare(model_id, messages, sampling)
    except UnknownModel as error:
        raise ApiError(404, str(error), param="model", code="model_not_found") from None
    except ModelRefused as error:
        raise ApiError(400, str(error), param="model", code="model_not_servable") from None
    except (AdapterIntegrityError, UnsafeArtifactError) as error:
        logger.error("refused to load %s: %s", model_id, error)
        raise ApiError(500, str(error), kind="server_error", param="model", code="adapter_refused") from None


async def _stream(engine: ServingEngine, job: Job, completion: Completion, include_usage: bool):
    """The answer as OpenAI chunks: role, content deltas, finish reason, (usage), ``[DONE]``.

    Generation runs in a thread; its deltas come through an asyncio queue. A client that goes away
    cancels the generation at the next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    put = lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value))  # noqa: E731

    def work() -> None:
        try:
            put("end", engine.run(job, lambda delta: put("delta", delta)))
        except Exception as error:  # reported in the stream: the 200 status is already sent
            logger.exception("generation for %s failed", job.target.model_id)
            put("error", error)

    loop.run_in_executor(None, work)
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "delta":
                yield completion.chunk({"content": value})
            elif kind == "error":
                yield sse(error_body(f"generation failed: {value}", "server_error"))
                break
            else:
                yield completion.chunk({}, value.finish_reason)
                if include_usage:
                    yield completion.usage_chunk(value)
                break
        yield DONE
    finally:
        job.cancelled.set()  # a client gone mid-answer stops the worker at its next token


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            param = ".".join(location) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}".replace("Value error, ", "")
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.error("request failed: %s", error, exc_info=error)
        return JSONResponse(error_body("internal error: see the server's log", "server_error"), status_code=500)
