"""The HTTP layer: Litestar routes for the Ollama API, thin wrappers over the service.

Handlers decode the body into a wire type, call one service method and wrap
what it returns; every error leaves as Ollama's ``{"error": "..."}`` (OpenAI's or
Anthropic's shape on /v1) with its status, never a traceback. A client that goes
away cancels its request: while the service works (waiting for the model, a
non-streamed generation) a watcher on the connection cancels the handler; once
streaming, Litestar stops the stream and the stream's close aborts the upstream
request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import msgspec
from litestar import Litestar, Request, Response, get, head, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.params import JSONBody
from litestar.response import Stream
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from . import __version__, wire
from .auth import Guard, KeyStore, too_large_message
from .catalog import Catalog
from .config import normalize_name
from .limits import Gate, bad_json, error_body, is_v1
from .passthrough import passthrough_router
from .schema import document
from .service import ApiError, OllamaService, Reply

log = logging.getLogger("vllama.app")

NDJSON = "application/x-ndjson"
OLLAMA_VERSION = "0.12.0"
"""The Ollama API version we speak: clients gate features on it."""
VERSION = wire.VersionResponse(version=OLLAMA_VERSION)

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
ROOT_TEXT = "Ollama is running"

_NOT_HERE = {
    "copy": "vLLama does not copy models: every model is an entry of models.yaml; "
            "to serve one under another name, add it to that entry's aliases",
    "create": "vLLama does not create models: models are defined in models.yaml "
              "(a Hugging Face repo or a local directory, served by vLLM); add an entry there",
    "push": "vLLama does not push models: it serves models from Hugging Face or local directories "
            "listed in models.yaml, and has no registry to push to",
    "blobs": "vLLama does not take model blobs: models are defined in models.yaml, not created from uploads",
}


def _error(status: int, message: str, retry_after: int | None = None) -> Response[Any]:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return Response(content={"error": message}, status_code=status, headers=headers, media_type="application/json")


def _head(body: bytes, media_type: str) -> Response[None]:
    """A HEAD answered as Ollama's Go server answers it: the GET's headers, Content-Length
    included, and no body (Litestar and uvicorn send none for a HEAD)."""
    return Response(None, headers={"content-type": media_type, "content-length": str(len(body))})


async def _close(stream: Any) -> None:
    await stream.aclose()


def _reply(reply: Reply, stream: bool) -> Response[Any] | Stream:
    if reply.stream is not None:
        # The background task runs once the response is over, also when the client
        # left mid-stream: it closes the relay, which closes the upstream request.
        return Stream(reply.stream, media_type=NDJSON, status_code=reply.status,
                      background=BackgroundTask(_close, reply.stream))
    return Response(content=reply.body, status_code=reply.status,
                    media_type=NDJSON if stream else "application/json")


async def until_gone(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (so vLLM stops too) and
    answer 499 ``request canceled``, as Ollama does (nobody reads it)."""
    task = asyncio.current_task()
    receive = request.receive
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
                if task is not None:
                    task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task is not None:
            task.uncancel()
            raise ApiError(499, "request canceled") from None
        raise
    finally:
        watcher.cancel()


def _router_error(request: Request[Any, Any, Any], status: int, message: str,
                  retry_after: int | None = None) -> Response[Any]:
    """An error the router makes itself, in the shape of the API the path belongs to
    (`limits.error_body`): Ollama's on /api and the rest, OpenAI's on /v1, Anthropic's on
    /v1/messages, as the pass-through's own errors are, so a client's SDK can read it."""
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return Response(error_body(request.url.path, status, message), status_code=status, headers=headers,
                    media_type="application/json")


def _on_api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    return _router_error(request, exc.status, exc.message, exc.retry_after)


def _on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's body-validation errors → one message naming the field."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for e in extra:
        if isinstance(e, dict):
            key = e.get("key")
            msg = str(e.get("message", ""))
            if key == "data" and msg == "'data'":
                return _router_error(request, 400, "missing request body")
            if key == "data":
                key = None  # the body as a whole
            parts.append(f"{key}: {msg}" if key else msg)
    detail = "; ".join(parts) or str(exc.detail)
    return _router_error(request, 400, detail)


#: What msgspec 0.23 says of a body that is not UTF-8 (older releases raised UnicodeDecodeError).
_NOT_UTF8 = "Invalid UTF-8 encoded string"


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, (NotFoundException, MethodNotAllowedException)):
        status = 404 if isinstance(exc, NotFoundException) else 405
        if is_v1(request.url.path):  # in OpenAI's words: "Invalid URL (POST /v1/responses)"
            what = "Invalid URL" if status == 404 else "Method not allowed"
            return _router_error(request, status, f"{what} ({request.method} {request.url.path})")
        return _error(status, "404 page not found" if status == 404 else "405 method not allowed")  # Go's mux
    detail = str(exc.detail)
    if exc.status_code == 400 and detail == _NOT_UTF8:
        detail = "invalid JSON: not valid UTF-8"
    elif exc.status_code == 400 and (detail.startswith("JSON is malformed") or detail == "Input data was truncated"):
        detail = f"invalid JSON: {detail if detail.startswith('JSON') else detail[0].lower() + detail[1:]}"
    if exc.status_code == 413:
        detail = too_large_message(request.app.request_max_body_size or 0)
    return _router_error(request, exc.status_code, detail)


def _on_crash(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", exc_info=exc)
    return _router_error(request, HTTP_500_INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")


def create_app(
    service: OllamaService,
    catalog: Catalog,
    *,
    extra_routes: Sequence[Any] = (),
    max_body_bytes: int = 64 << 20,
    auth: KeyStore | None = None,
    max_inflight: int | None = None,
) -> Litestar:
    """The Ollama API and the OpenAI/Anthropic pass-through; `extra_routes` adds the
    admin and metrics routes (see serve). `auth`: API keys (router.auth); `max_inflight`:
    the server-wide cap on requests in flight (router.limits)."""
    catalog.attach(service.fleet)

    @get("/", media_type="text/plain", sync_to_thread=False)
    def root() -> str:
        return ROOT_TEXT

    @head("/", sync_to_thread=False)
    def root_head() -> Response[None]:
        return _head(ROOT_TEXT.encode(), "text/plain; charset=utf-8")

    @get("/api/version", sync_to_thread=False)
    def version() -> wire.VersionResponse:
        return VERSION

    @head("/api/version", sync_to_thread=False)
    def version_head() -> Response[None]:
        return _head(_encode(VERSION), "application/json")

    @post("/api/generate", status_code=200)
    async def generate(request: Request[Any, Any, Any], data: JSONBody[wire.GenerateRequest]) -> Response[Any] | Stream:
        return _reply(await until_gone(request, service.generate(data)), data.stream is not False)

    @post("/api/chat", status_code=200)
    async def chat(request: Request[Any, Any, Any], data: JSONBody[wire.ChatRequest]) -> Response[Any] | Stream:
        return _reply(await until_gone(request, service.chat(data)), data.stream is not False)

    @post("/api/embed", status_code=200)
    async def embed(request: Request[Any, Any, Any], data: JSONBody[wire.EmbedRequest]) -> Response[Any] | Stream:
        return _reply(await until_gone(request, service.embed(data)), False)

    @post("/api/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any], data: JSONBody[wire.EmbeddingsRequest]) -> Response[Any] | Stream:
        return _reply(await until_gone(request, service.embeddings(data)), False)

    @get("/api/tags", sync_to_thread=True)
    def tags() -> wire.TagsResponse:
        return catalog.tags()

    @head("/api/tags", sync_to_thread=True)
    def tags_head() -> Response[None]:
        return _head(_encode(catalog.tags()), "application/json")

    @post("/api/show", status_code=200, sync_to_thread=True)
    def show(data: JSONBody[wire.ModelRequest]) -> wire.ShowResponse:
        if not data.target:
            raise ApiError(400, "model is required")
        out = catalog.show(data.target, bool(data.verbose))
        if out is None:
            raise ApiError(404, f"model '{normalize_name(data.target)}' not found")
        return out

    @get("/api/ps", sync_to_thread=True)
    def ps() -> wire.PsResponse:
        return catalog.ps()

    def not_here(what: str) -> Any:
        def handler() -> Response[Any]:
            return _error(501, _NOT_HERE[what])

        return handler

    def blobs_head() -> None:
        raise ApiError(501, _NOT_HERE["blobs"])

    refusals = [
        post(f"/api/{what}", status_code=501, sync_to_thread=False, name=f"refuse-{what}")(not_here(what))
        for what in ("copy", "create", "push")
    ] + [
        post("/api/blobs/{digest:str}", sync_to_thread=False, name="refuse-blobs-post")(not_here("blobs")),
        head("/api/blobs/{digest:str}", sync_to_thread=False, name="refuse-blobs-head")(blobs_head),
    ]

    middleware: list[Any] = []
    if auth is not None:
        middleware.append(Guard(auth, lambda: service.fleet.config, max_body_bytes).middleware)
    if max_inflight is not None:
        middleware.append(Gate(max_inflight).middleware)
    app = Litestar(
        route_handlers=[root, root_head, version, version_head, generate, chat, embed, embeddings, tags, tags_head,
                        show, ps, *refusals, passthrough_router(service.fleet, service.upstream), *extra_routes],
        exception_handlers={
            ApiError: _on_api_error,
            ValidationException: _on_validation,
            HTTPException: _on_http,
            RecursionError: bad_json,
            UnicodeDecodeError: bad_json,
            Exception: _on_crash,
        },
        openapi_config=OpenAPIConfig(title="vLLama", version=__version__, path="/openapi"),
        request_max_body_size=max_body_bytes,
        middleware=middleware,
        debug=False,
        logging_config=None,
    )
    document(app)
    return app
