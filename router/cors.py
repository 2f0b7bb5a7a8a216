"""CORS: which browser pages may call the API, as Ollama decides it.

A browser sends ``Origin`` with every cross-origin request and asks first (an ``OPTIONS``
preflight) before one a plain form could not send. Ollama (gin-contrib/cors, configured by
envconfig.Origins) allows ``http(s)://localhost``, ``127.0.0.1`` and ``0.0.0.0`` on any
port, and ``app://``, ``file://``, ``tauri://``, ``vscode-webview://``, ``vscode-file://``
pages, plus ``OLLAMA_ORIGINS``; here `server.origins` takes that variable's place (the
defaults always stay, as in Ollama). A request from any other origin is refused with 403
before anything else runs: a page may send a "simple" POST (``text/plain``) without a
preflight, and answering it without the CORS headers would only hide the reply from the
page, not stop the request (a pull, an admin stop).

`Cors` sits in front of the API keys (`serve.LiveServer.wrap`): a preflight carries no
key, so it is answered here, while the request that follows still needs one. Its
`origins` may change while serving (a reload of models.yaml's `server.origins`).

Litestar's own `CORSMiddleware` is private API and runs inside the app, after the keys
(every preflight would get 401), and lets a disallowed origin's request through; its
`CORSConfig` is used here for the matching (``*`` wildcards).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from litestar.config.cors import CORSConfig

from .limits import ASGIApp, Receive, Scope, Send, send_error

log = logging.getLogger("vllama.cors")

DEFAULT_ORIGINS: tuple[str, ...] = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
"""Ollama's own list (envconfig.Origins), always allowed."""

ALLOW_HEADERS: tuple[str, ...] = (
    # Ollama's list
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
    *(f"x-stainless-{p}" for p in ("arch", "async", "custom-poll-interval", "helper-method", "lang", "os",
                                   "package-version", "poll-helper", "retry-count", "runtime",
                                   "runtime-version", "timeout")),
    # beside it: newer OpenAI clients' header, and what vLLama reads or passes on for Anthropic's
    "x-stainless-read-timeout", "X-Api-Key", "Anthropic-Version", "Anthropic-Beta", "Anthropic-Dangerous-Direct-Browser-Access",
    "X-Request-Id",
)
ALLOW_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
MAX_AGE = 12 * 3600
"""How long a browser may keep a preflight's answer (gin-contrib/cors's default, Ollama's)."""
_METHODS = ",".join(ALLOW_METHODS).encode()
_HEADERS = ",".join(ALLOW_HEADERS).encode()


def not_allowed_message(origin: str) -> str:
    return f"origin {origin!r} is not allowed (add it to server.origins)"


class Cors:
    """Ollama's CORS rules for the allowed `origins` (the defaults plus `extra`)."""

    def __init__(self, extra: list[str] | tuple[str, ...] = ()) -> None:
        self.origins = list(extra)

    @property
    def origins(self) -> list[str]:
        """The extra origins (server.origins); setting them applies from the next request."""
        return self._extra

    @origins.setter
    def origins(self, extra: list[str]) -> None:
        self._extra = list(extra)
        # Browsers send scheme and host in lower case; Ollama compares them so too.
        self.config = CORSConfig(allow_origins=[o.lower() for o in (*DEFAULT_ORIGINS, *extra)])
        if self.config.is_allow_all_origins:
            log.warning("server.origins has \"*\": any web page a user of this machine opens may call the API%s",
                        "" if extra == ["*"] else " (the other origins listed add nothing)")

    def allows(self, origin: str) -> bool:
        """Whether a page of `origin` (an ``Origin`` header's value) may call the API."""
        return self.config.is_origin_allowed(origin.lower())

    def middleware(self, app: ASGIApp) -> ASGIApp:
        cors = self

        async def checked(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            await cors(app, scope, receive, send)

        return checked

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin")
        if origin is None or _same_host(origin, _header(scope, b"host")):
            # Not cross-origin: curl, SDKs, or a page the router serves itself (gin-contrib/cors's rule).
            await app(scope, receive, send)
            return
        config = self.config  # one request, one setting, even if a reload lands meanwhile
        if not config.is_origin_allowed(origin.lower()):  # as `allows`, on this request's setting
            log.warning("403 for %s %s: origin %r is not allowed (server.origins)",
                        scope["method"], scope["path"], origin)
            await send_error(send, scope["path"], 403, not_allowed_message(origin))
            return
        allow = "*" if config.is_allow_all_origins else origin
        if scope["method"] == "OPTIONS":
            await self._preflight(send, allow)
            return
        await app(scope, receive, _with_origin(send, allow))

    @staticmethod
    async def _preflight(send: Send, allow: str) -> None:
        """204 with what the page may send, as gin-contrib/cors answers (any OPTIONS from an allowed
        origin): the browser, not the server, checks its request against the lists."""
        headers = [(b"access-control-allow-origin", allow.encode("latin-1")), (b"access-control-allow-methods", _METHODS),
                   (b"access-control-allow-headers", _HEADERS), (b"access-control-max-age", str(MAX_AGE).encode())]
        if allow != "*":
            headers.append((b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


def _same_host(origin: str, host: str | None) -> bool:
    return host is not None and origin in (f"http://{host}", f"https://{host}")


def _with_origin(send: Send, allow: str) -> Send:
    """`send` that adds the allowed origin to the response's start (errors included: the page may read them)."""

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers") or () if k.lower() != b"access-control-allow-origin"]
            headers.append((b"access-control-allow-origin", allow.encode("latin-1")))
            if allow != "*":
                headers.append((b"vary", b"Origin"))
            message["headers"] = headers
        await send(message)

    return sending
