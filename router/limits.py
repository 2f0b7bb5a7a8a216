"""Limits that keep a few clients from taking the whole server.

* `Gate`: a server-wide cap on requests in flight (``server.max_inflight``). A
  stream counts until its last byte. Beyond the cap: 503 with ``Retry-After``
  and Ollama's own wording, at once; nothing queues in the router. The probes
  clients poll (``/``, ``/api/version``) are never refused.
* `guarded_http`: uvicorn's httptools protocol with the deadlines uvicorn lacks
  (slow loris). A request head must arrive whole within `header_timeout` of its
  first byte (or of the connection opening) and within `max_head_bytes`; a body
  must keep coming (`body_timeout` between reads); a response the client stops
  reading for `write_timeout` ends the connection. Otherwise 408 (or 431) and
  the connection is closed, so a slow client never holds a request slot, a
  connection or an upstream generation for long. Idle keep-alive connections
  are closed by uvicorn's own ``timeout_keep_alive``.
* `BodyLimit`: the request body limit (``server.max_body_mb``) on every route, checked
  against ``content-length`` before anything is read (a chunked body is read up to the
  limit). Its `limit`, like `Gate.limit`, may change while serving (a reload).
* `canonical_paths`: every layer in front of Litestar sees a path as Litestar routes it
  (``/api//pull/`` is ``/api/pull``), so that no check that compares paths can be walked
  around by spelling one differently.
* `error_body`: an error in the shape of the API a path belongs to (Ollama's
  ``{"error": "..."}``, OpenAI's or Anthropic's for the pass-through routes),
  for the answers given here and by `auth`, before any handler runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import msgspec

log = logging.getLogger("vllama.limits")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BUSY = "server busy, please try again.  maximum pending requests exceeded"
"""Ollama's message when its queue is full (OLLAMA_MAX_QUEUE), word for word."""
RETRY_AFTER = 1
#: What clients and monitoring poll to see whether the server is up: never refused, never counted.
PROBES = frozenset({"/", "/api/version", "/metrics"})

_encode = msgspec.json.Encoder().encode

_OPENAI_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                 404: "NotFoundError", 405: "MethodNotAllowedError", 408: "RequestTimeoutError",
                 413: "RequestTooLargeError", 431: "BadRequestError", 500: "InternalServerError",
                 503: "ServiceUnavailableError"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    413: "request_too_large", 431: "invalid_request_error", 503: "overloaded_error"}


def canonical_path(path: str) -> str:
    """`path` as Litestar routes it: runs of slashes are one, and a trailing slash is dropped
    (``//api//pull/`` reaches the ``/api/pull`` handler)."""
    if "//" not in path and (not path.endswith("/") or path == "/"):
        return path  # nearly every request
    return "/" + "/".join(part for part in path.split("/") if part)


def canonical_paths(app: ASGIApp) -> ASGIApp:
    """`app` called with the canonical path (`canonical_path`) in its scope.

    The layers in front of the handlers (the admin-route and per-model checks of `auth`,
    the error shapes here) compare ``scope["path"]`` with the routes as strings; Litestar
    matches ``/api/pull/`` and ``//api/pull`` to ``/api/pull`` too, so without this a key
    that may not pull could pull by adding a slash.
    """

    async def canonical(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = canonical_path(scope["path"])
            if path != scope["path"]:
                scope = {**scope, "path": path, "raw_path": path.encode()}
        await app(scope, receive, send)

    return canonical


def is_v1(path: str) -> bool:
    """A path of the OpenAI/Anthropic API (/v1 and below): its errors are in their shapes."""
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, status: int, message: str) -> bytes:
    """`message` as the API of `path` writes errors."""
    if path.startswith("/v1/messages"):
        return _encode({"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                                   "message": message}})
    if is_v1(path):
        return _encode({"error": {"message": message, "type": _OPENAI_TYPES.get(status, "APIError"),
                                  "param": None, "code": status}})
    return _encode({"error": message})


async def send_error(send: Send, path: str, status: int, message: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(path, status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bad_json(request: Any, exc: Exception) -> Any:
    """Litestar exception handler for what JSON decoders raise beside their own error: a body
    nested deeper than they recurse (RecursionError), a string that is not UTF-8
    (UnicodeDecodeError). Both are the client's malformed JSON: 400, not a crash."""
    from litestar import Response

    why = "nested too deeply" if isinstance(exc, RecursionError) else "not valid UTF-8"
    return Response(error_body(request.url.path, 400, f"invalid JSON: {why}"), status_code=400,
                    media_type="application/json")


class Gate:
    """At most `limit` requests in flight, server-wide (shared by every route's middleware)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_inflight must be ≥ 1, got {limit}")
        self.limit = limit
        self.inflight = 0
        self.refused = 0

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Litestar builds middleware once per route; every copy counts on this one gate."""
        gate = self

        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] in PROBES:
                await app(scope, receive, send)
                return
            if gate.inflight >= gate.limit:
                gate.refused += 1
                if gate.refused == 1 or gate.refused % 1000 == 0:
                    log.warning("%d requests in flight (server.max_inflight): refusing with 503 (%d so far)",
                                gate.inflight, gate.refused)
                await send_error(send, scope["path"], 503, BUSY, [(b"retry-after", str(RETRY_AFTER).encode())])
                return
            gate.inflight += 1
            try:
                await app(scope, receive, send)
            finally:
                gate.inflight -= 1

        return limited


# --- request bodies ----------------------------------------------------------------------------


def too_large_message(limit: int) -> str:
    return f"request body too large: the limit is {limit / (1 << 20):g} MiB (server.max_body_mb)"


async def too_large(send: Send, path: str, limit: int) -> None:
    await send_error(send, path, 413, too_large_message(limit))


def declared_length(scope: Scope) -> int | None:
    """The request's ``content-length`` (None when absent or not a number)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def is_chunked(scope: Scope) -> bool:
    """A body sent without a length (``transfer-encoding``): only reading it tells its size."""
    return any(name == b"transfer-encoding" for name, _ in scope.get("headers") or ())


async def read_body(scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
    """The whole body (within `limit`), or None once an error was sent (or the client left)."""
    length = declared_length(scope)
    if length is not None and length > limit:
        await too_large(send, scope["path"], limit)
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await too_large(send, scope["path"], limit)
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that gives `body`, already read, first."""
    sent = False

    async def replayed() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class BodyLimit:
    """At most `limit` bytes of request body, on every route; a reload may change `limit`.

    Litestar has a limit of its own, but it keeps the first value each route resolved, so a
    limit that follows models.yaml while serving has to be checked here, in front of it.
    A declared length is checked before any byte is read (the HTTP parser never passes on
    more than it declares); a chunked body is read up to the limit, then handed on.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def middleware(self, app: ASGIApp) -> ASGIApp:
        body_limit = self

        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            limit = body_limit.limit
            length = declared_length(scope)
            if length is not None and length > limit:
                await too_large(send, scope["path"], limit)
                return
            if length is None and is_chunked(scope):
                body = await read_body(scope, receive, send, limit)
                if body is None:
                    return
                receive = replay(body, receive)
            await app(scope, receive, send)

        return limited


# --- slow clients ------------------------------------------------------------------------------

HEADER_TIMEOUT = 30.0
BODY_TIMEOUT = 60.0
WRITE_TIMEOUT = 300.0
MAX_HEAD_BYTES = 64 * 1024


def guarded_http(header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, max_head_bytes: int = MAX_HEAD_BYTES) -> type:
    """uvicorn's httptools protocol class with these deadlines (pass it as ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._write_timer: asyncio.TimerHandle | None = None
            self._body_at = 0.0
            self._in_head = True
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            for attr in ("_head_timer", "_body_timer", "_write_timer"):
                handle = getattr(self, attr, None)
                if handle is not None:
                    handle.cancel()
                    setattr(self, attr, None)
            super().connection_lost(exc)

        # --- the request head ---

        def data_received(self, data: bytes) -> None:
            in_head = self._in_head
            super().data_received(data)
            if in_head and self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self._refuse(431, f"request head larger than {max_head_bytes // 1024} KiB")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().on_headers_complete()
            self._body_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(body_timeout, self._body_check)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                if self._head_bytes:
                    self._refuse(408, f"request head not received within {header_timeout:g}s")
                else:  # a connection that never said anything: nobody to answer
                    self.transport.close()

        # --- the request body ---

        def on_body(self, body: bytes) -> None:
            self._body_at = self.loop.time()
            super().on_body(body)

        def on_message_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

        def _body_check(self) -> None:
            self._body_timer = None
            if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
                return
            now = self.loop.time()
            if self.flow.read_paused:  # the app has not read what came: not the client's fault
                self._body_at = now
            idle = now - self._body_at
            if idle < body_timeout:
                self._body_timer = self.loop.call_later(body_timeout - idle, self._body_check)
                return
            self._refuse(408, f"request body stalled for {body_timeout:g}s")

        # --- the response ---

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_expired)

        def resume_writing(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().resume_writing()

        def _write_expired(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():
                log.warning("%s: the client read nothing for %gs; closing its connection",
                            _peer(self.client), write_timeout)
                self.transport.abort()  # close() would wait for the unread buffer to drain

        def _refuse(self, status: int, message: str) -> None:
            log.warning("%s: %s; closing the connection", _peer(self.client), message)
            started = self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started
            if not started:
                path = self.scope.get("path", "/") if self.scope else "/"
                body = error_body(path, status, message)
                reason = b"Request Timeout" if status == 408 else b"Request Header Fields Too Large"
                self.transport.write(b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                     b"connection: close\r\n\r\n%b" % (status, reason, len(body), body))
            if self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedHttpToolsProtocol


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "client"
