"""The HTTP layer: Litestar routes for the Ollama API, thin wrappers over the service.

Handlers decode the body into a wire type, call one service method and wrap
what it returns; every error leaves as Ollama's ``{"error": "..."}`` with its
status, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, head, post
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from . import __version__, wire
from .catalog import Catalog
from .service import ApiError, OllamaService, Reply

log = logging.getLogger("vllama.app")

NDJSON = "application/x-ndjson"
OLLAMA_VERSION = "0.12.0"
"""The Ollama API version we speak: clients gate features on it."""


def _error(status: int, message: str, retry_after: int | None = None) -> Response[Any]:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return Response(content={"error": message}, status_code=status, headers=headers, media_type="application/json")


def _reply(reply: Reply, stream: bool) -> Response[Any] | Stream:
    if reply.stream is not None:
        return Stream(reply.stream, media_type=NDJSON, status_code=reply.status)
    return Response(content=reply.body, status_code=reply.status,
                    media_type=NDJSON if stream else "application/json")


def _on_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    return _error(exc.status, exc.message, exc.retry_after)


def _on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's body-validation errors → one message naming the field."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for e in extra:
        if isinstance(e, dict):
            key = e.get("key")
            msg = str(e.get("message", ""))
            parts.append(f"{key}: {msg}" if key else msg)
    detail = "; ".join(parts) or str(exc.detail)
    if "missing" in detail.lower() and "body" in detail.lower():
        detail = "missing request body"
    return _error(400, detail)


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, NotFoundException):
        return _error(404, "404 page not found")
    return _error(exc.status_code, str(exc.detail))


def _on_crash(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", exc_info=exc)
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")


def create_app(
    service: OllamaService,
    catalog: Catalog,
    *,
    extra_routes: Sequence[Any] = (),
    max_body_bytes: int = 64 << 20,
) -> Litestar:
    """The Ollama API; `extra_routes` adds the admin and metrics routes (see serve)."""
    @get("/", media_type="text/plain", sync_to_thread=False)
    def root() -> str:
        return "Ollama is running"

    @head("/", media_type="text/plain", sync_to_thread=False)
    def root_head() -> None:
        return None

    @get("/api/version", sync_to_thread=False)
    def version() -> wire.VersionResponse:
        return wire.VersionResponse(version=OLLAMA_VERSION)

    @head("/api/version", sync_to_thread=False)
    def version_head() -> None:
        return None

    @post("/api/generate", status_code=200)
    async def generate(data: wire.GenerateRequest) -> Response[Any] | Stream:
        return _reply(await service.generate(data), data.stream is not False)

    @post("/api/chat", status_code=200)
    async def chat(data: wire.ChatRequest) -> Response[Any] | Stream:
        return _reply(await service.chat(data), data.stream is not False)

    @get("/api/tags", sync_to_thread=False)
    def tags() -> wire.TagsResponse:
        return catalog.tags()

    return Litestar(
        route_handlers=[root, root_head, version, version_head, generate, chat, tags, *extra_routes],
        exception_handlers={
            ApiError: _on_api_error,
            ValidationException: _on_validation,
            HTTPException: _on_http,
            Exception: _on_crash,
        },
        openapi_config=OpenAPIConfig(title="vLLama", version=__version__, path="/openapi"),
        request_max_body_size=max_body_bytes,
        debug=False,
        logging_config=None,
    )
