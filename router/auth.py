"""API keys: who may call the router, which models each key may use, who may administer.

Off by default (``server.auth.enabled``), and the server binds to 127.0.0.1 by
default. When on, every request needs a key, sent as ``Authorization: Bearer
<key>`` (OpenAI and Ollama clients) or ``x-api-key: <key>`` (Anthropic's),
except the probes clients poll before anything else: ``GET``/``HEAD /`` and
``/api/version``.

Keys come from ``server.auth.keys_file`` (YAML or JSON)::

    keys:
      - {name: team, key: "..."}                              # every model
      - {name: intern, key: "...", models: [tiny, qwen3:8b]}  # these models only
      - {name: ci, sha256: "<hex digest of the key>"}         # the key itself not on disk
    admin_keys:
      - {name: ops, key: "..."}                                # or just the key as a string

and from the environment: ``$VLLAMA_API_KEYS`` (``key,key:model1|model2``) and
``$VLLAMA_ADMIN_KEYS`` (``key,key``) (`Auth.env_var`, `Auth.admin_env_var`).
The file is re-read when it changes (checked at most once a second); a file
that no longer parses leaves the keys in use as they were.

Rules: an admin key may do everything. The admin routes (``/vllama/*`` other
than reads, ``/api/pull``, ``/api/delete``) need an admin key: 403 otherwise.
A key with ``models`` may use those models only (names or aliases, resolved
against the registry in use, so a reload that adds an alias applies at once):
a request naming another model gets 403, and the listings (``/api/tags``,
``/api/ps``, ``/v1/models``, ``/vllama/models``) show it only its models.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every
key every time (no early exit): the time taken says nothing about how much of a
key was right, nor which key matched. Keys are never logged; a key is named in
logs by its ``name``, or by the first 8 hex digits of its digest.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml

from .config import Auth, Config
from .limits import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    canonical_paths,
    read_body,
    replay,
    send_error,
    too_large_message,  # noqa: F401 (app.py imports it from here)
)

log = logging.getLogger("vllama.auth")

MIN_KEY_LENGTH = 16
INVALID = "missing or invalid API key"
ADMIN_ONLY = "this route needs an admin API key"
RELOAD_EVERY = 1.0

#: Paths whose requests must name a model in their JSON body (``model``; /api/show also ``name``).
MODEL_ROUTES = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens",
})
#: Listings filtered for a key limited to some models: path → (key of the list, key of the name).
LISTINGS = {"/api/tags": ("models", "name"), "/api/ps": ("models", "name"), "/v1/models": ("data", "id"),
            "/vllama/models": (None, "name")}
ADMIN_PATHS = frozenset({"/api/pull", "/api/delete"})
PUBLIC = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/api/version"), ("HEAD", "/api/version")})


class AuthError(Exception):
    """The key configuration cannot be used (the server refuses to start on it)."""


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to and what it may do."""

    name: str
    models: frozenset[str] | None = None
    """Names or aliases it may use; None: every model."""
    admin: bool = False

    def may_use(self, config: Config, requested: str) -> bool:
        if self.models is None:
            return True
        model = config.lookup(requested)
        if model is None:
            return False  # not found: say "not allowed", not whether it exists
        return any(config.lookup(name) is model for name in self.models)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_label(key: str) -> str:
    """How a key without a name appears in logs: never the key, only a short hash."""
    return "key-" + digest(key).hex()[:8]


class _Entry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: str | None = None
    sha256: str | None = None
    name: str | None = None
    models: list[str] | None = None


class _KeysFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keys: list[_Entry | str] = []
    admin_keys: list[_Entry | str] = []


def _entries_from_file(path: Path) -> list[tuple[bytes, Principal]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise AuthError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        parsed = msgspec.convert(data or {}, _KeysFile)
    except (ValueError, yaml.YAMLError, msgspec.ValidationError) as e:
        raise AuthError(f"{path}: {e}") from None
    out = []
    for admin, items in ((False, parsed.keys), (True, parsed.admin_keys)):
        where = "admin_keys" if admin else "keys"
        for i, item in enumerate(items):
            entry = _Entry(key=item) if isinstance(item, str) else item
            out.append(_principal(entry, admin, f"{path}: {where}[{i}]"))
    return out


def _principal(entry: _Entry, admin: bool, where: str) -> tuple[bytes, Principal]:
    if (entry.key is None) == (entry.sha256 is None):
        raise AuthError(f"{where}: give either key or sha256")
    if entry.key is not None:
        if len(entry.key) < MIN_KEY_LENGTH:
            raise AuthError(f"{where}: a key must be at least {MIN_KEY_LENGTH} characters "
                            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        d = digest(entry.key)
    else:
        try:
            d = bytes.fromhex(entry.sha256 or "")
        except ValueError:
            d = b""
        if len(d) != 32:
            raise AuthError(f"{where}: sha256 must be 64 hex digits")
    if admin and entry.models is not None:
        raise AuthError(f"{where}: admin keys may use every model; drop `models`")
    name = entry.name or "key-" + d.hex()[:8]
    models = frozenset(entry.models) if entry.models is not None else None
    return d, Principal(name=name, models=models, admin=admin)


def _entries_from_env(environ: Mapping[str, str], var: str, admin: bool) -> list[tuple[bytes, Principal]]:
    out = []
    for i, item in enumerate(x.strip() for x in environ.get(var, "").split(",")):
        if not item:
            continue
        key, _, models = item.partition(":") if not admin else (item, "", "")
        names = [m.strip() for m in models.split("|") if m.strip()] if models else None
        d, p = _principal(_Entry(key=key, models=names), admin, f"${var}[{i}]")
        out.append((d, Principal(name=f"{'admin' if admin else 'env'}:{d.hex()[:8]}", models=p.models, admin=admin)))
    return out


class KeyStore:
    """The keys in use; `identify` a request's key in constant time."""

    def __init__(self, entries: list[tuple[bytes, Principal]], *, path: Path | None = None,
                 env_entries: list[tuple[bytes, Principal]] | None = None) -> None:
        self.path = path
        self._env = list(env_entries or [])
        self._file: list[tuple[bytes, Principal]] = list(entries)
        self._entries = self._merge()
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    @classmethod
    def from_config(cls, auth: Auth, base_dir: Path | None = None,
                    environ: Mapping[str, str] | None = None) -> KeyStore | None:
        """The keys of `auth` (None when auth is off); AuthError if on but unusable."""
        if not auth.enabled:
            return None
        environ = os.environ if environ is None else environ
        env = _entries_from_env(environ, auth.env_var, False) + _entries_from_env(environ, auth.admin_env_var, True)
        path = None
        entries: list[tuple[bytes, Principal]] = []
        if auth.keys_file:
            path = (Path(base_dir or Path.cwd()) / Path(auth.keys_file).expanduser()).resolve()
            entries = _entries_from_file(path)
        store = cls(entries, path=path, env_entries=env)
        if not store._entries:
            raise AuthError("server.auth is enabled but no API key is configured: set server.auth.keys_file, "
                            f"${auth.env_var} or ${auth.admin_env_var}")
        return store

    def _merge(self) -> list[tuple[bytes, Principal]]:
        entries = [*self._file, *self._env]
        seen: dict[bytes, str] = {}
        for d, p in entries:
            if d in seen:
                where = f"{self.path}: " if self.path else ""
                raise AuthError(f"{where}the same key is given twice ({seen[d]} and {p.name})")
            seen[d] = p.name
        return entries

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RELOAD_EVERY:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._file = _entries_from_file(self.path)
            self._entries = self._merge()
        except AuthError as e:
            log.error("keys file not reloaded, the keys in use stay: %s", e)
            return
        log.info("reloaded %d API keys from %s", len(self._file), self.path)

    @property
    def principals(self) -> list[Principal]:
        return [p for _, p in self._entries]

    def identify(self, key: str | None) -> Principal | None:
        """The principal `key` belongs to, or None. Constant time in the key's content."""
        self._maybe_reload()
        if not key:
            return None
        d = digest(key)
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, d) and found is None:
                found = principal
        return found


def presented_key(scope: Scope) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("utf-8", "replace").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("utf-8", "replace").strip()
    return None


def _is_admin_route(method: str, path: str) -> bool:
    if path in ADMIN_PATHS:
        return True
    return path.startswith("/vllama/") and method not in ("GET", "HEAD")


class _Names(msgspec.Struct):
    model: Any = None
    name: Any = None


_decode_names = msgspec.json.Decoder(_Names).decode


class Guard:
    """The ASGI middleware enforcing the rules above; `config` gives the registry in use.

    `store` and `max_body_bytes` are read on every request, so a reload may change them
    while serving (router.serve): a store set takes effect from the next request, and None
    (auth off) lets every request through.
    """

    def __init__(self, store: KeyStore | None, config: Any, max_body_bytes: int = 64 << 20) -> None:
        self.store = store
        self._config = config
        self.max_body_bytes = max_body_bytes

    @property
    def config(self) -> Config:
        c = self._config
        return c() if callable(c) else c

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """`app` behind the keys; the paths checked are the ones the router routes (`canonical_paths`)."""
        guard = self

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            await guard(app, scope, receive, send)

        return canonical_paths(guarded)

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        store = self.store
        if store is None or (method, path) in PUBLIC:
            await app(scope, receive, send)
            return
        principal = store.identify(presented_key(scope))
        if principal is None:
            client = scope.get("client")
            log.warning("401 for %s %s from %s: %s", method, path, client[0] if client else "?", INVALID)
            await send_error(send, path, 401, INVALID, [(b"www-authenticate", b'Bearer realm="vllama"')])
            return
        scope.setdefault("state", {})["api_key"] = principal.name
        if principal.admin:
            await app(scope, receive, send)
            return
        if _is_admin_route(method, path):
            log.warning("403 for %s %s: key %s is not an admin key", method, path, principal.name)
            await send_error(send, path, 403, ADMIN_ONLY)
            return
        if principal.models is None:
            await app(scope, receive, send)
            return
        # A key limited to some models.
        named = _model_in_path(path)
        if named is not None:
            if not principal.may_use(self.config, named):
                await self._forbidden(send, path, principal, named)
                return
        elif path in MODEL_ROUTES and method == "POST":
            body = await read_body(scope, receive, send, self.max_body_bytes)
            if body is None:
                return
            requested = _requested_model(body, path)
            if requested is not None and not principal.may_use(self.config, requested):
                await self._forbidden(send, path, principal, requested)
                return
            receive = replay(body, receive)
        elif path in LISTINGS and method == "GET":
            send = self._filtering(send, path, principal)
        await app(scope, receive, send)

    async def _forbidden(self, send: Send, path: str, principal: Principal, model: str) -> None:
        log.warning("403 for %s: key %s may not use model %r", path, principal.name, model)
        await send_error(send, path, 403, f'this API key may not use model "{model}"')

    def _filtering(self, send: Send, path: str, principal: Principal) -> Send:
        """`send` that drops, from a JSON listing, the models `principal` may not use."""
        list_key, name_key = LISTINGS[path]
        start: MutableMapping[str, Any] | None = None
        parts: list[bytes] = []
        config = self.config

        async def filtered(message: MutableMapping[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message.get("status") != 200:
                    await send(message)
                    return
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(parts)
            try:
                doc = msgspec.json.decode(body)
                items = doc[list_key] if list_key else doc
                kept = [m for m in items if isinstance(m, dict)
                        and principal.may_use(config, str(m.get(name_key, "")))]
                if list_key:
                    doc[list_key] = kept
                else:
                    doc = kept
                body = msgspec.json.encode(doc)
            except (msgspec.DecodeError, KeyError, TypeError):
                body = b"{}" if list_key else b"[]"  # never let an unfiltered listing through
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return filtered


def _model_in_path(path: str) -> str | None:
    """The model named by the path: ``/v1/models/{model}``, ``/vllama/models/{name}[/...]``."""
    if path.startswith("/v1/models/"):
        return path[len("/v1/models/"):] or None
    if path.startswith("/vllama/models/"):
        return path[len("/vllama/models/"):].split("/", 1)[0] or None
    return None


def _requested_model(body: bytes, path: str) -> str | None:
    """The body's model (None if the body is not one the handler accepts: it answers 400 itself)."""
    try:
        names = _decode_names(body)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    model = names.model
    if path == "/api/show" and not model:
        model = names.name
    return model if isinstance(model, str) and model else None


def warn_if_exposed(host: str, store: KeyStore | None) -> None:
    """A server reachable from other machines without keys deserves a line in the log."""
    if store is not None:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("listening on %s without API keys: anyone who can reach it may use and manage every model "
                    "(set server.auth.enabled and keys)", host)

