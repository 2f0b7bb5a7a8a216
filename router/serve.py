"""`vllama serve`: supervisord, the fleet of vLLM servers and the HTTP API, in one process.

Order matters at both ends. Starting: leftovers of an earlier run are stopped
(they may hold GPU memory), supervisord comes up on its private socket, models
are registered and started in order, and the API listens at once (requests to
a model that is starting wait for it). Stopping (SIGTERM, Ctrl-C): the API
stops accepting, in-flight requests get `shutdown_grace` seconds (those still
running then are ended with an error saying so, `ApiServer`), then every vLLM
process group is stopped, then supervisord. If supervisord dies under us, we
shut down rather than serve without process control, and exit non-zero
(`StopSignals.exit_status`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import uvicorn
import uvloop

from . import limits, supervisor
from .admin import admin_router, library_routes
from .app import create_app
from .auth import AuthError, Guard, KeyStore, warn_if_exposed
from .catalog import Catalog
from .config import Config, ConfigError, Server, resolve_state_dir, server_changes
from .cors import Cors
from .hosts import host_check, is_loopback
from .lifecycle import SEVER_EVERY, Fleet, ReloadRejected, Runtime
from .limits import ASGIApp, BodyLimit, Gate, canonical_paths
from .metrics import Metrics, metrics_route
from .service import OllamaService
from .supervisor import Paths, Supervisor, SupervisorError
from .upstream import Timeouts, Upstream, sever_connections

log = logging.getLogger("vllama.serve")

SUPERVISOR_LOST = 1
"""Exit status of a `vllama serve` that stopped because supervisord died: a failure, so that a
service manager (systemd's ``Restart=on-failure``) starts it again."""
END_MARGIN = 5
"""Seconds uvicorn's own shutdown deadline comes after server.shutdown_grace. At the grace,
`ApiServer` ends the requests still in flight itself; uvicorn's deadline only cancels what
that left (with a traceback per request), so it must come later."""


@dataclass
class Options:
    host: str | None = None
    port: int | None = None
    state_dir: Path | None = None
    attach: bool = False
    """Use the supervisord that runs us (top-level supervisord.conf) instead of starting one."""
    log_level: str = "info"


async def watch_registry(fleet: Fleet) -> None:
    """Reload when models.yaml is saved (editors replace the file: watch its directory)."""
    from watchfiles import awatch

    path = fleet.config.path
    assert path is not None
    def ours(_: object, changed: str) -> bool:
        return Path(changed).resolve() == path

    # step: a save must be quiet for 200 ms before it is read, so one written in several
    # pieces (or truncated, then written) is read once, whole; load_settled checks again.
    async for _ in awatch(path.parent, debounce=500, step=200, recursive=False, watch_filter=ours):
        log.info("%s changed; reloading", path)
        try:
            await fleet.reload_file()
        except Exception:  # a reload that went wrong must not end the watching
            log.exception("reload of %s failed", path)


def state_dir_for(config: Config, override: Path | None) -> Path:
    if override:
        return override.resolve()
    if config.server.state_dir:
        return resolve_state_dir(config.server.state_dir, config.base_dir)
    return supervisor.default_state_dir()


def http_config(app: Any, config: Config, opts: Options) -> uvicorn.Config:
    """uvicorn as the API runs on it: httptools with deadlines for slow clients, uvloop, no access log."""
    s = config.server
    return uvicorn.Config(
        app,
        host=opts.host or s.host,
        port=opts.port or s.port,
        loop="uvloop",
        http=limits.guarded_http(),
        lifespan="off",
        access_log=False,
        log_level=opts.log_level,
        timeout_graceful_shutdown=math.ceil(s.shutdown_grace) + END_MARGIN,
        timeout_keep_alive=30,
    )


def body_bytes(server: Server) -> int:
    return int(server.max_body_mb * 1024 * 1024)


def upstream_timeouts(server: Server) -> Timeouts:
    return Timeouts(server.connect_timeout, server.first_token_timeout, server.between_tokens_timeout)


@dataclass
class LiveServer:
    """The `server` settings of models.yaml that a reload applies while serving, and those it cannot.

    The request path reads the allowed origins, the key store, the body limit, the in-flight
    cap and the upstream timeouts from these objects on every request, so a reload that
    changes them holds from the next request (turning auth on included). The keys read once
    at startup (see config.LIVE_SERVER_KEYS) are never silently dropped: `restart_needed`
    names those that differ from `started`.
    """

    started: Server
    """The `server` section serving began with."""
    cors: Cors
    """The browser origins allowed (server.origins beside Ollama's defaults)."""
    guard: Guard
    body: BodyLimit
    gate: Gate
    upstream: Upstream
    """The client to the vLLM servers: its timeouts follow server.*_timeout."""
    host: str
    """The address listened on (for the warning about serving it without keys, and `hosts`)."""

    @classmethod
    def create(cls, config: Config, fleet: Fleet, keys: KeyStore | None, host: str) -> LiveServer:
        s = config.server
        return cls(started=s, cors=Cors(s.origins), guard=Guard(keys, lambda: fleet.config, body_bytes(s)),
                   body=BodyLimit(body_bytes(s)), gate=Gate(s.max_inflight), upstream=fleet.upstream, host=host)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """`app` behind the host check, CORS, the keys, the body limit and the in-flight cap, in that order.

        On a loopback address, a request for a host that is not a local name (a page that
        rebound its domain to 127.0.0.1: `hosts`) is refused before anything. CORS comes
        next because a browser's preflight carries no key: it is answered there (the
        request that follows still needs its key), and a page of an origin not allowed is
        refused before anything else. A request without a valid key is refused before its
        body is read or it takes a slot."""
        wrapped = self.cors.middleware(self.guard.middleware(self.body.middleware(self.gate.middleware(app))))
        # Outermost: every layer, and every error's shape, sees the path Litestar routes.
        return canonical_paths(host_check(wrapped) if is_loopback(self.host) else wrapped)

    def restart_needed(self, current: Server) -> list[str]:
        """The keys of `current` that differ from what serving began with and only a restart applies."""
        return ["server." + key for key in server_changes(self.started, current)[1]]

    def keys_for(self, old: Config, new: Config) -> KeyStore | None:
        """The key store `new` asks for (the one in use if its auth is unchanged: it re-reads its
        file itself); AuthError if unusable, before anything changes."""
        if new.server.auth == old.server.auth:
            return self.guard.store
        return KeyStore.from_config(new.server.auth, new.base_dir)

    def apply(self, server: Server, keys: KeyStore | None) -> None:
        """Serve the next request with `server`'s live keys; a switch of auth is a WARNING either way."""
        was = self.guard.store
        if server.origins != self.cors.origins:
            self.cors.origins = server.origins
        self.guard.store = keys
        self.guard.max_body_bytes = self.body.limit = body_bytes(server)
        self.gate.limit = server.max_inflight
        self.upstream.set_timeouts(upstream_timeouts(server))
        if was is None and keys is not None:
            log.warning("server.auth is now enabled: every request needs an API key")
        elif was is not None and keys is None:
            log.warning("server.auth is now disabled: requests are no longer checked for API keys")
            warn_if_exposed(self.host, None)


class ServingFleet(Fleet):
    """The fleet of `vllama serve`: its reloads apply the `server` section too (`LiveServer`).

    A server section that cannot be used (auth on without a readable key) rejects the whole
    reload like an invalid registry: the previous settings keep serving. Settings apply before
    the models do, so that auth turned on protects the next request, and are put back if the
    registry is then rejected.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.live: LiveServer | None = None
        self._server_lock = asyncio.Lock()
        """One reload at a time from its check to its end: a rejected one puts back its own predecessor's settings."""

    async def reload(self, new: Config) -> dict[str, list[str]]:
        live = self.live
        if live is None:
            return await super().reload(new)
        async with self._server_lock:
            return await self._reload_with_server(live, new)

    async def _reload_with_server(self, live: LiveServer, new: Config) -> dict[str, list[str]]:
        old = self.config
        try:
            keys = live.keys_for(old, new)
        except AuthError as e:
            raise ConfigError([f"server.auth: {e}"], str(new.path) if new.path else None) from None
        previous = live.guard.store
        live.apply(new.server, keys)
        try:
            d = await super().reload(new)
        except ReloadRejected:
            live.apply(old.server, previous)
            raise
        return {**d, **self._report(live, old.server, new.server)}

    async def end_requests(self, grace: float) -> None:
        """End every request still in flight at a model (server.shutdown_grace, `grace`, is over),
        each with its API's error saying that vllama is shutting down.

        Their connections to vLLM are cut, as a stop of their model cuts them
        (`Fleet._stop_process`): streams end with their usual error line or event and a proper
        end of the body, and a whole answer still awaited gets its error, in the words of
        `Lease.explain`, here the shutdown's. Cut again each `SEVER_EVERY` until none is left
        (a request may be sent again on a fresh connection); cancelled when the HTTP server is
        done."""
        busy = [rt for rt in self._all() if rt.inflight]
        if not busy:
            return
        log.warning("server.shutdown_grace (%gs) is over: ending %d request(s) still in flight with an error",
                    grace, sum(rt.inflight for rt in busy))
        for rt in busy:
            rt.interrupt(f'vllama is shutting down: model "{rt.name}" was stopped while answering')
        while busy:
            for rt in busy:
                port = upstream_port(rt)
                if port is not None:
                    await asyncio.to_thread(sever_connections, port)
            await asyncio.sleep(SEVER_EVERY)
            busy = [rt for rt in busy if rt.inflight]

    @staticmethod
    def _report(live: LiveServer, old: Server, new: Server) -> dict[str, list[str]]:
        """What the reload did with the `server` section, logged and returned with its changes."""
        applied, restart = server_changes(old, new)
        pending = live.restart_needed(new)
        if applied:
            log.info("server settings applied: %s", ", ".join(applied))
        if restart:
            log.warning("models.yaml changed %s: not applied, `vllama serve` must be restarted for it "
                        "(still serving with the values it started with)", ", ".join("server." + k for k in restart))
        return {"server_applied": ["server." + k for k in applied], "restart_needed": pending}


def upstream_port(rt: Runtime) -> int | None:
    """The port `rt`'s server listens on (a ``url`` model's too: `sever_connections` cuts only loopback ones)."""
    return rt.port if rt.port is not None else urlsplit(rt.base_url).port


class ApiServer(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown ends what is still in flight when the grace is over.

    uvicorn itself would cancel those requests: streams cut with no end of the body (curl's
    exit 18, httpx's "incomplete chunked read") and a traceback logged for each. Instead,
    requests waiting for a model to start are answered 503 at once (`Fleet.begin_shutdown`),
    and at server.shutdown_grace (as it is when the shutdown begins: reloads change it),
    `ServingFleet.end_requests` ends them with an error, and uvicorn's own deadline comes
    `END_MARGIN` seconds later, for whatever that could not end.
    """

    def __init__(self, config: uvicorn.Config, fleet: ServingFleet) -> None:
        super().__init__(config)
        self.fleet = fleet

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self.fleet.begin_shutdown()  # requests waiting for a model to start get a 503 now, not after the grace
        grace = self.fleet.config.server.shutdown_grace
        self.config.timeout_graceful_shutdown = math.ceil(grace) + END_MARGIN
        ending = asyncio.ensure_future(self._end_after(grace))
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    async def _end_after(self, grace: float) -> None:
        await asyncio.sleep(grace)
        await self.fleet.end_requests(grace)


def api_app(config: Config, fleet: ServingFleet, service: OllamaService, keys: KeyStore | None, host: str,
            extra_routes: list[Any]) -> ASGIApp:
    """The API as `vllama serve` serves it: Litestar behind `fleet.live` (set here), which holds
    the allowed origins, the keys, the body limit and the in-flight cap, so that a reload
    changes them; Litestar gets no body limit of its own (it would keep the first value each
    route saw)."""
    live = fleet.live = LiveServer.create(config, fleet, keys, host)
    routes = [admin_router(fleet, fleet.memory, restart_needed=lambda: live.restart_needed(fleet.config.server)),
              *library_routes(fleet), *extra_routes]
    return live.wrap(create_app(service, Catalog(config), extra_routes=routes, max_body_bytes=sys.maxsize))


class StopSignals:
    """SIGTERM and Ctrl-C stop `vllama serve` at any point, through its cleanup.

    Booting (supervisord, placement, the first starts) takes a while, and a signal then
    must still stop us: it cancels the boot. While serving, uvicorn has handlers of its
    own; it re-raises the signal once it returns, and landing here then lets the cleanup
    run (the default SIGTERM action would kill us before it). A stop nobody asked for
    (supervisord died: `supervisor_lost`) is recorded too, for the exit status.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.lost_supervisor = False
        """supervisord died under us (`supervisor_lost`): the exit is a failure."""
        self.server: uvicorn.Server | None = None
        self.boot: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def supervisor_lost(self) -> None:
        """supervisord is gone (the fleet's monitor saw it): stop serving, and say so in the exit status."""
        self.lost_supervisor = True
        if self.server is not None:
            self.server.should_exit = True

    def exit_status(self) -> int:
        """0 for a stop that was asked for (a signal); `SUPERVISOR_LOST` when supervisord died under us."""
        return SUPERVISOR_LOST if self.lost_supervisor else 0

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.received.append(sig)
        if self.server is not None:
            self.server.should_exit = True
        if self.boot is not None:
            self._loop.call_soon_threadsafe(self.boot.cancel)  # a handler may interrupt the loop itself


async def run(config: Config, opts: Options) -> int:
    keys = KeyStore.from_config(config.server.auth, config.base_dir)  # AuthError before anything starts
    with StopSignals() as stop:
        return await _serve(config, opts, keys, stop)


async def _serve(config: Config, opts: Options, keys: KeyStore | None, stop: StopSignals) -> int:
    paths = Paths(state_dir_for(config, opts.state_dir))
    lock: int | None = None
    if opts.attach:
        sup = Supervisor.attach(paths)
    else:
        paths.create()
        lock = supervisor.claim(paths)  # before kill_stale: those must be a dead run's processes, not a live one's
        killed = supervisor.kill_stale(paths.root)
        if killed:
            log.warning("stopped %d processes left by an earlier run in %s: %s", len(killed), paths.root, killed)
        sup = Supervisor.spawn(paths)
    log.info("supervisord ready on %s", paths.socket)

    s = config.server
    upstream = Upstream(upstream_timeouts(s))
    fleet = ServingFleet(config, sup, upstream, on_supervisor_lost=stop.supervisor_lost)
    metrics = Metrics()
    fleet.metrics = metrics
    service = OllamaService(fleet, upstream)
    app = api_app(config, fleet, service, keys, opts.host or s.host, [metrics_route(metrics, fleet)])
    live = fleet.live
    assert live is not None
    warn_if_exposed(live.host, keys)

    server = stop.server = ApiServer(http_config(app, config, opts), fleet)
    loop = asyncio.get_running_loop()
    def on_hangup() -> None:
        log.info("SIGHUP; reloading %s", config.path)
        asyncio.ensure_future(fleet.reload_file())

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    watcher = asyncio.create_task(watch_registry(fleet)) if s.watch and config.path else None
    try:
        if not stop.received:
            stop.boot = asyncio.ensure_future(fleet.start())
            try:
                await stop.boot
            except asyncio.CancelledError:
                if not stop.received:  # we are cancelled ourselves
                    raise
        if stop.received:
            log.info("stopped before serving (signal %d)", stop.received[0])
        else:
            await server.serve()
    finally:
        log.info("stopping models and supervisord")
        if watcher is not None:
            watcher.cancel()
        try:
            await fleet.close()
            if opts.attach:
                await sup.stop_all()
            else:
                await sup.shutdown()
        finally:
            if not opts.attach:
                # If supervisord died first (or could not be told), its vLLMs live on:
                # never leave them holding memory.
                leftovers = supervisor.kill_stale(paths.root)
                if leftovers:
                    log.warning("stopped %d leftover processes: %s", len(leftovers), leftovers)
            if lock is not None:
                os.close(lock)
            await upstream.aclose()
    return stop.exit_status()


def main(config: Config, opts: Options) -> int:
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    # Ctrl-C and SIGTERM are handled by uvicorn (graceful); a second one forces exit.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        # uvloop for the router's own loop: asyncio.run would make a default loop before
        # uvicorn's loop="uvloop" could apply (about 10% less CPU per request, measured).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run(config, opts))
    except (AuthError, SupervisorError) as e:
        log.error("%s", e)
        return 2
