"""Each model's life: stopped → starting → ready ⇄ unhealthy, restarting, failed; ready → stopping → stopped.

supervisord says whether a model's process lives; vLLM's ``/health`` says
whether it serves. `Fleet` joins the two into one state per model, starts
models in order (two vLLMs must not profile one device at once), lets requests
wait for a model that is starting, and keeps the reason and the log lines of
every failure so that an error names its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from . import engine, gpu, hub, placement, supervisor
from .config import Config, ConfigError, Model, is_local_source, load_settled, parse_duration
from .gpu import HostMemory, Inventory, format_cpu_list
from .supervisor import Supervisor
from .upstream import Upstream, sever_connections

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("vllama.lifecycle")

FOREVER = math.inf
LOG_TAIL_LINES = 50
UNHEALTHY_AFTER = 3
"""Failed /health probes in a row (one a second) before a ready model counts as unhealthy."""


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    FAILED = "failed"
    MISSING = "missing"
    """A Hub model not in the cache, with auto_pull off: `vllama pull` it."""
    STOPPING = "stopping"
    """supervisord is stopping it: requests wait and start it again once it is down."""


class ModelNotFound(Exception):
    def __init__(self, name: str, detail: str | None = None) -> None:
        super().__init__(f'model "{name}" not found, try pulling it first' + (f" ({detail})" if detail else ""))
        self.name = name


class ModelUnavailable(Exception):
    """The model exists but cannot serve now: 503, with the reason and a retry hint."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass
class Runtime:
    """What the router knows about one model right now."""

    model: Model
    port: int | None
    base_url: str
    launch: Config
    """The registry it was launched from: its program is rendered from it, so a reload's new
    engine settings reach only the servers started for them, never a running one."""
    program: str = ""
    """Its supervisord program: model and port, so that a changed model's new server can
    start beside the old one (rolling restart); `Fleet._runtime_for` makes it unique."""
    state: State = State.STOPPED
    reason: str = "not started"
    since: float = field(default_factory=time.time)
    pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    inflight: int = 0
    waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: float = 300.0
    expires_at: float | None = None
    log_tail: list[str] = field(default_factory=list)
    wanted: bool = False
    failed_probes: int = 0
    failed_starts: int = 0
    """Exits since the last time it was ready (crash-loop detection)."""
    queued: bool = False
    """Asked to start, waiting for the start lock (another model is starting)."""
    launching: bool = False
    """`Fleet._launch` is starting it: that loop, not the monitor, handles its exits."""
    held: bool = False
    """Stopped by an admin: requests get 503 until `vllama start` (no surprise restarts)."""
    start_requested: float = 0.0
    stops: int = 0
    """Stops the router began (`Fleet._stop_process`): a request that holds the model across one
    lost its server to it (see `Lease.explain`)."""
    stop_note: str = ""
    """What the latest of those stops tells a request it cut short (see `stop_note`)."""
    pending: Model | None = None
    """The registry's newer definition of this model while this server, launched from the one
    before, still serves: a rolling replacement starts it beside this one (`Fleet._replace`)."""
    pending_error: str | None = None
    """Why that replacement did not start. This server then serves on with the previous
    configuration, and the fleet counts the change as not applied: a reload of the same file,
    or `vllama restart`, tries it again (`Fleet._serving`)."""
    changed: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def remote(self) -> bool:
        return self.model.url is not None

    def __post_init__(self) -> None:
        self.program = self.program or f"{self.model.program}-{self.port}"

    @property
    def always(self) -> bool:
        return self.model.load == "always"

    def interrupt(self, note: str) -> None:
        """The router is about to cut this server's requests in flight (a stop, a shutdown): each
        of them tells its client `note` instead of "the server closed the connection"
        (`Lease.explain`)."""
        self.stops += 1
        self.stop_note = note

    @property
    def change_note(self) -> str | None:
        """What `vllama ps` says of a saved change that does not serve yet (see `pending`)."""
        if self.pending is None:
            return None
        if self.pending_error is None:
            return "its saved configuration is starting beside this server, which serves until it is ready"
        return (f"its saved configuration did not start ({self.pending_error}); still serving the previous "
                f"one until `vllama reload` or `vllama restart {self.name}` tries it again")


@dataclass
class Lease:
    """A request's hold on a model: counted in flight (and in the metrics) until released.

    The request's outcome (`status`, token counts) is filled in by the service
    before release, so the metrics count each request once, however it ends.
    """

    fleet: Fleet
    runtime: Runtime
    keep_alive: float | None = None
    tracker: Any = None
    status: int = 200
    prompt_tokens: int = 0
    output_tokens: int = 0
    _done: bool = False
    _stops: int = field(default=0, init=False)
    """The model's `Runtime.stops` when this request took it."""

    def __post_init__(self) -> None:
        self._stops = self.runtime.stops

    def explain(self, message: str, status: int = 502) -> str:
        """What the client is told of a failed call to the model's server: `message`, unless the
        router stopped that server under this request.

        A stop cuts the connections of the requests in flight, which then fail as if the server
        had crashed ("closed the connection", an aborted generation); the stop's note is the true
        account (an admin stop, a reload, a crash loop given up). A 4xx `status` is vLLM's
        verdict on the request itself and is always kept.
        """
        stopped = self.runtime.stops != self._stops
        return self.runtime.stop_note if stopped and status >= 500 else message

    def first_token(self) -> None:
        if self.tracker is not None:
            self.tracker.first_token()

    def usage(self, prompt_tokens: int, output_tokens: int) -> None:
        self.prompt_tokens, self.output_tokens = prompt_tokens, output_tokens

    def release(self) -> None:
        if not self._done:
            self._done = True
            self.fleet._release(self)
            if self.tracker is not None:
                self.tracker.finished(self.status, self.prompt_tokens, self.output_tokens)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?")
_USAGE_ERROR = re.compile(r"^[\w.-]+(?: [\w.-]+)*: error: \S")
"""argparse's last word on a bad command line (``api_server.py: error: unrecognized arguments:
--bogus-flag``, or ``vllm serve: error: …``): written to stderr after the usage text, with
neither a traceback nor ``Error`` in it, and vLLM exits 2 before it logs anything else."""
_ACCESS_LINE = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" \d{3}')
"""uvicorn's access log (``"POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error``):
a request's outcome, never why the server died."""


def telling_error(lines: list[str], limit: int = 400) -> str:
    """The line of a vLLM log that says why it died: the last exception raised.

    A Python traceback ends with ``SomeError: message`` at column 0, sometimes
    followed by indented detail (pydantic's ``Value error, …``); a command line vLLM's
    argparse refuses ends with ``prog: error: message``. Without either, the last line
    naming an error, else nothing: the last line of a log is most often an access-log or
    progress line, which reads as a cause and is not one.
    """
    for i in range(len(lines) - 1, -1, -1):
        if _USAGE_ERROR.match(lines[i]):
            return lines[i].strip()[:limit]
        if _EXCEPTION_LINE.match(lines[i]):
            parts = [lines[i].strip()]
            for extra in lines[i + 1:i + 3]:
                if extra.startswith((" ", "\t")) and "errors.pydantic.dev" not in extra:
                    parts.append(extra.strip())
            text = " ".join(parts)
            return text if len(text) <= limit else text[:limit] + "…"
    for line in reversed(lines):
        if ("ERROR" in line or "Error" in line) and not _ACCESS_LINE.search(line):
            return line.strip()[:limit]
    return ""


def reap_group(pgid: int, *, stopped: bool = False) -> None:
    """Kill what is left of a vLLM server's process group once its leader is gone.

    supervisord starts each program as a process-group leader and signals the
    group when *it* stops a program, but when the API server dies on its own
    (OOM, kill -9) its EngineCore and workers live on, holding the model's
    memory: worth a warning. After a deliberate stop (`stopped`) the group got
    supervisord's TERM too, and stopProcess returns once the leader is gone,
    while its EngineCore may still be on its way out: killing that is routine
    (debug). The group id is the dead leader's pid.
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if stopped:
        log.debug("killed what was left of stopped process group %d", pgid)
    else:
        log.warning("killed leftover processes of group %d (its leader exited on its own)", pgid)


SEVER_EVERY = 0.25
"""Seconds between two cuts of the connections to a server being stopped."""


def stop_note(name: str, why: str) -> str:
    """What a request cut short by a stop of its model tells the client: `why` it was stopped."""
    return f'model "{name}" was stopped ({why}) while answering'


def shutting_down(rt: Runtime) -> str:
    """The 503 of a request for a model that is not ready when vllama begins to stop."""
    return f'vllama is shutting down; model "{rt.name}" is {rt.state.value}, not ready, and will not be started'


def free_port(start: int, taken: set[int]) -> int:
    """The first port from `start` that is neither taken by the registry nor bound."""
    for port in range(start, 65536):
        if port not in taken:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    pass
    raise OSError(f"no free port for a vLLM server from {start} to 65535: lower engine.base_port")


class ReloadRejected(Exception):
    """A new registry that would not fit: nothing was changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


#: Keys that only change how the router treats a model: applied without a restart.
LIVE_KEYS = frozenset({"aliases", "load", "keep_alive", "max_queue", "auto_pull"})


def diff(old: Config, new: Config, serving: Mapping[str, tuple[Config, Model]] | None = None) -> dict[str, list[str]]:
    """Which models a reload adds, removes, must restart (`changed`) or only updates.

    `serving`: for a model whose server still runs another definition than `old`'s (a change
    of it that did not start), that definition and the registry it was launched from. The
    model is compared with what serves, not with what the file said: the same file again is
    a change to try again, and a file put back to what serves is no change.
    """
    serving = serving or {}
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "updated": [], "unchanged": []}
    for name, m in after.items():
        if name not in before:
            out["added"].append(name)
            continue
        was_config, was = serving.get(name, (old, before[name]))
        out[_compare(was_config, was, new, m)].append(name)
    out["removed"] = [name for name in before if name not in after]
    return out


def _compare(old: Config, before: Model, new: Config, after: Model) -> str:
    """"changed" (its server must restart), "updated" (only `LIVE_KEYS` differ) or "unchanged"."""
    a, b = msgspec.structs.asdict(before), msgspec.structs.asdict(after)
    launch_a = {k: v for k, v in a.items() if k not in LIVE_KEYS}
    launch_b = {k: v for k, v in b.items() if k not in LIVE_KEYS}
    if launch_a != launch_b or (old.engine != new.engine and not after.url) or (
            old.source_path(before) != new.source_path(after)):
        return "changed"
    return "updated" if a != b else "unchanged"


class Fleet:
    """All models of the registry and their processes."""

    def __init__(
        self,
        config: Config,
        sup: Supervisor | None,
        upstream: Upstream,
        *,
        inventory: Callable[[], Inventory | HostMemory] | None = None,
        on_supervisor_lost: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.sup = sup
        self.upstream = upstream
        self._inventory = inventory
        self._modes: dict[str, gpu.DeviceMode] = {}
        """What each engine.device setting was resolved to, by its first read (see `_read`)."""
        self._mode_lock = threading.Lock()
        self.placements: dict[str, placement.Placement] = {}
        """Budget of each server that runs or is about to, by its program name."""
        self.on_supervisor_lost = on_supervisor_lost
        self.runtimes: dict[str, Runtime] = {}
        self.retiring: list[Runtime] = []
        """Servers outside `runtimes` during a reload: old ones draining before they stop,
        and new ones starting beside the server they will replace."""
        self.reload_error: str | None = None
        """Why the last reload was rejected (shown by `vllama ps`), None if it applied."""
        self._generation: dict[str, int] = {}
        """Bumped for a model by each reload that changes or removes it: a replacement that an
        earlier reload began checks it before it swaps servers, so the latest registry wins."""
        self._reload_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False
        self._shutdown = asyncio.Event()
        """Set when vllama begins to stop (`begin_shutdown`): requests stop waiting for starts."""
        self.missing_check_interval = 5.0
        """Seconds between looks for the files of missing `always` models (see `_start_downloaded`)."""
        self._missing_checked = 0.0
        self.evictions = 0
        self.metrics: Metrics | None = None
        """Set by serve: starts, stops and evictions are counted there too."""

    # --- setup -------------------------------------------------------------------

    def _all(self) -> list[Runtime]:
        """Every server we run: the serving ones and those being replaced on a reload."""
        return [*self.runtimes.values(), *self.retiring]

    def _runtime_for(self, model: Model) -> Runtime:
        if model.url:
            return Runtime(model=model, port=None, base_url=model.url.rstrip("/"), launch=self.config,
                           wanted=True, reason="remote server")
        taken = {m.port for m in self.config.models if m.port} | {self.config.server.port}
        taken |= {rt.port for rt in self._all() if rt.port}
        port = model.port or free_port(self.config.engine.base_port, taken)
        rt = Runtime(model=model, port=port, base_url=f"http://127.0.0.1:{port}", launch=self.config)
        # A model with a fixed port keeps it across a reload: its old server, still draining,
        # has that program name, and each server needs a program (and log) of its own.
        programs = {r.program for r in self._all()}
        n = 2
        while rt.program in programs:
            rt.program = f"{model.program}-{port}-{n}"
            n += 1
        rt.keep_alive = parse_duration(model.keep_alive)
        return rt

    @contextlib.contextmanager
    def inventory(self, config: Config | None = None) -> Iterator[Inventory | HostMemory]:
        """What placement plans on, read now: GPUs (NVML) or host memory, for the engine
        device of `config` (a reload's new registry may change it), else the current one.
        NVML is initialised for each read and shut down after it; the mode (GPU or CPU)
        is not decided again on each read (see `_read`)."""
        inv = self._inventory() if self._inventory is not None else self._read(config or self.config)
        try:
            yield inv
        finally:
            if isinstance(inv, gpu.NvmlInventory):
                inv.close()

    def _read(self, config: Config) -> Inventory | HostMemory:
        """`config`'s inventory, in the mode its engine.device was resolved to by its first read.

        Resolving ``auto`` on every read would turn one read during an NVML failure (a
        driver upgrade before the reboot) into a CPU plan on a GPU box; in the mode kept,
        that read refuses the GPU models in NVML's words instead. A reload that changes
        engine.device is resolved on its first read, when the reload is planned.
        """
        device = config.engine.device
        with self._mode_lock:
            mode = self._modes.get(device)
            if mode is None:
                mode, inv = gpu.decide(device)
                self._modes[device] = mode
                return inv
        return mode.read()

    def programs(self) -> list[supervisor.Program]:
        out = []
        for rt in self._all():
            if rt.remote or rt.port is None:
                continue
            p = self.placements.get(rt.program)
            args, env = (list(p.vllm_args), dict(p.env)) if p else ([], {})
            out.append(engine.program(rt.launch, rt.model, rt.port, name=rt.program, extra_args=args, extra_env=env))
        return out

    async def start(self) -> None:
        """Register every model with supervisord, start the `always` ones in order, watch them."""
        async with self._reload_lock:  # a registry saved during boot is applied after it
            await self._boot()
        self._monitor = asyncio.create_task(self._watch(), name="vllama-monitor")

    async def _boot(self) -> None:
        for m in self.config.models:
            self.runtimes[m.name] = self._runtime_for(m)
        # Place the `always` models together (best fit over all of them); one still to be
        # downloaded is placed once its files, and so its size, are known.
        boot = [rt.model for rt in self.runtimes.values()
                if rt.always and not rt.remote and self.model_dir(rt.model) is not None]
        plan = await asyncio.to_thread(self._plan, boot)
        for name, p in plan.placements.items():
            self.placements[self.runtimes[name].program] = p
        for name, problems in plan.refused.items():
            await self._set(self.runtimes[name], State.FAILED, "does not fit: " + "; ".join(problems))
        if self.sup is not None:
            await self.sup.apply(self.programs())
        for rt in self.runtimes.values():
            if rt.always and not rt.remote and rt.state != State.FAILED:
                await self.start_model(rt)

    def begin_shutdown(self) -> None:
        """vllama is stopping: a request waiting for a model to start gets a 503 at once.

        Such a request would otherwise hold the HTTP server's drain (server.shutdown_grace)
        until the model is ready and has answered it, only to have the model stopped right
        after. Requests in flight on a ready model are left to finish. Plain (not async) so
        that a signal handler can schedule it (`loop.call_soon_threadsafe`) before the drain;
        `close` calls it too.
        """
        self._shutdown.set()

    async def close(self) -> None:
        """Stop watching and starting models, and SIGKILL the servers that never became ready.

        Called once the HTTP server has drained; supervisord then stops the rest (SIGTERM).
        """
        self.begin_shutdown()
        unserved = self._unserved()  # before the cancel: a cancelled replacement leaves `retiring`
        self._closing = True
        for t in [*self._tasks, *( [self._monitor] if self._monitor else [])]:
            t.cancel()
        for t in [*self._tasks, *([self._monitor] if self._monitor else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for rt in unserved:
            await self._kill(rt)

    def _unserved(self) -> list[Runtime]:
        """Our servers that answer no request: starting, restarting, or being stopped."""
        return [rt for rt in self._all() if not rt.remote
                and rt.state in (State.STARTING, State.RESTARTING, State.STOPPING)]

    async def _kill(self, rt: Runtime) -> None:
        """SIGKILL `rt`'s process group at once (shutdown only: its start is no longer awaited).

        A vLLM that is still initialising ignores SIGTERM: supervisord's stop would wait
        engine.stopwaitsecs (20 s by default) before its SIGKILL, holding `vllama serve`'s exit
        that long for a server that has answered nothing. A ready server gets supervisord's
        SIGTERM instead: it exits at once, releasing its devices cleanly.
        """
        if self.sup is None:
            return
        pid = await self.sup.kill(rt.program)
        if pid is not None:
            log.info("%s: killed its process group %d at once (it was %s and served nothing; a vLLM "
                     "still initialising ignores SIGTERM)", rt.name, pid, rt.state.value)
            rt.pid = None
            await self._set(rt, State.STOPPED, "killed at shutdown while it was not ready")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ModelUnavailable):
                log.warning("%s", exc)
            else:
                log.error("background task failed", exc_info=exc)

    # --- lookups -------------------------------------------------------------------

    def get(self, name: str) -> Runtime:
        model = self.config.lookup(name)
        if model is None or model.name not in self.runtimes:
            raise ModelNotFound(name)
        return self.runtimes[model.name]

    @property
    def inflight(self) -> int:
        return sum(rt.inflight for rt in self.runtimes.values())

    # --- state ---------------------------------------------------------------------

    async def _set(self, rt: Runtime, state: State, reason: str) -> None:
        if rt.state == state and rt.reason == reason:
            return
        level = logging.WARNING if state in (State.FAILED, State.UNHEALTHY, State.RESTARTING) else logging.INFO
        log.log(level, "%s: %s → %s (%s)", rt.name, rt.state, state, reason)
        rt.state, rt.reason, rt.since = state, reason, time.time()
        if state == State.READY and rt.started_at is None:
            rt.started_at = time.time()
        if state in (State.STOPPED, State.FAILED):
            rt.started_at = None
        async with rt.changed:
            rt.changed.notify_all()

    def log_path(self, rt: Runtime) -> Path | None:
        return self.sup.paths.log(rt.program) if self.sup and not rt.remote else None

    def log_tail(self, rt: Runtime) -> list[str]:
        """The last lines of the model's vLLM log, kept for error messages."""
        p = self.log_path(rt)
        rt.log_tail = supervisor.tail_file(p, LOG_TAIL_LINES) if p else []
        return rt.log_tail

    def failure_reason(self, rt: Runtime, what: str) -> str:
        """`what` plus the error the model's log ends with (see `telling_error`)."""
        detail = telling_error(self.log_tail(rt))
        return f"{what}: {detail}" if detail else what

    async def _healthy(self, rt: Runtime) -> bool:
        try:
            r = await self.upstream.get(rt.base_url, "/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def _serves_name(self, rt: Runtime) -> bool:
        try:
            r = await self.upstream.get(rt.base_url, "/v1/models", timeout=2.0)
            ids = {m.get("id") for m in r.json().get("data", [])}
        except (httpx.HTTPError, ValueError):
            return False
        return rt.model.served_name in ids

    async def _observe(self, rt: Runtime, info: dict[str, Any] | None) -> None:
        """Fold supervisord's view and a health probe into the model's state."""
        if rt.remote:
            ok = await self._healthy(rt)
            await self._set(rt, State.READY if ok else State.UNHEALTHY,
                            "remote server answers /health" if ok else "remote server does not answer /health")
            return
        if rt.state == State.STOPPING:
            return  # `stop_model` owns it until supervisord has stopped it
        sstate = info["statename"] if info else "STOPPED"
        pid = info.get("pid") or None if info else None
        if rt.pid is not None and pid != rt.pid:
            reap_group(rt.pid)
            gone, rt.pid = rt.pid, None
            if not rt.launching and rt.state != State.STOPPED and await self._exited(
                    rt, await self._exit_what(rt, info, gone)):
                return
        if sstate in ("STARTING", "RUNNING"):
            rt.pid = pid
            if rt.state in (State.STOPPED, State.RESTARTING, State.FAILED):
                rt.started_at = None
                await self._set(rt, State.STARTING, f"process {pid} started; waiting for /health")
            if await self._healthy(rt):
                rt.failed_probes = 0
                if rt.state != State.READY and await self._serves_name(rt):
                    rt.failed_starts = 0
                    await self._set(rt, State.READY, f"process {pid} answers /health")
            elif rt.state == State.READY:
                # One slow answer on a busy machine is not a sick server: three in a row are.
                rt.failed_probes += 1
                if rt.failed_probes >= UNHEALTHY_AFTER:
                    await self._set(rt, State.UNHEALTHY, f"process lives but /health failed {rt.failed_probes} times")
        elif sstate in ("BACKOFF", "EXITED", "FATAL"):
            rt.pid = None
            if rt.launching:
                return  # `_launch` sees this exit itself
            if not rt.wanted:
                if rt.state not in (State.STOPPED, State.FAILED, State.MISSING):
                    await self._set(rt, State.STOPPED, "exited")
            elif rt.state not in (State.RESTARTING, State.FAILED):
                await self._exited(rt, await self._exit_what(rt, info))
        else:  # STOPPED, STOPPING, UNKNOWN
            rt.pid = None
            if rt.queued or rt.launching or (rt.wanted and time.monotonic() - rt.start_requested < 5):
                return  # we just asked supervisord to start it; its view has not caught up
            if rt.state not in (State.STOPPED, State.FAILED, State.MISSING):
                await self._set(rt, State.STOPPED, "stopped")

    async def _exit_what(self, rt: Runtime, info: dict[str, Any] | None, pid: int | None = None) -> str:
        """"process 123 exited (killed by SIGKILL)": how it ended, from supervisord, not
        from the log (whose last line is as often an access-log line as a cause; the
        log's error, if any, is added by `failure_reason`)."""
        cause = await self.sup.exit_cause(rt.program, info) if self.sup is not None else None
        who = f"process {pid}" if pid else "process"
        return f"{who} exited ({cause})" if cause else f"{who} exited"

    async def _exited(self, rt: Runtime, what: str) -> bool:
        """A server exited on its own: start it again in its turn; True if given up."""
        if await self._crashed(rt, what):
            return True
        self._spawn(self._restart(rt))
        return False

    async def _restart(self, rt: Runtime) -> None:
        async with self._start_lock:
            if rt.wanted and rt.state == State.RESTARTING and any(r is rt for r in self._all()):
                await self._launch(rt, self.config.server.cold_start_timeout)

    async def _crashed(self, rt: Runtime, what: str, *, starting: bool = False) -> bool:
        """Count a crash; give up (stop, `failed`) after `startretries` crashes before ready.

        vLLM fails late (a bad checkpoint, out of memory while profiling), long after
        supervisord's `startsecs`, so the router counts the failed starts itself: without
        this a model that can never start would be restarted forever.
        """
        rt.restarts += 1
        if starting or rt.state == State.STARTING:
            rt.failed_starts += 1
        if rt.failed_starts > self.config.engine.startretries:
            rt.wanted = False
            gave_up = f"exited {rt.failed_starts} times before it was ready; gave up"
            await self._set(rt, State.FAILED, self.failure_reason(rt, gave_up))
            if self.sup is not None:
                await self._stop_process(rt, stop_note(rt.name, f"it {gave_up}"))
            return True
        reason = self.failure_reason(rt, what)
        await self._set(rt, State.RESTARTING, reason)
        if "Address already in use" in reason and rt.model.port is None and self.sup is not None:
            await self._move_port(rt)
        return False

    async def _move_port(self, rt: Runtime) -> None:
        """Another process took the port this model was given: give it a free one (the
        restart that follows starts it there)."""
        old_program = rt.program
        moving = "its port was taken by another process; it restarts on another"
        await self._stop_process(rt, stop_note(rt.name, moving))
        taken = {r.port for r in self._all() if r.port} | {self.config.server.port}
        rt.port = free_port((rt.port or self.config.engine.base_port) + 1, taken)
        rt.base_url = f"http://127.0.0.1:{rt.port}"
        rt.program = f"{rt.model.program}-{rt.port}"
        if old_program in self.placements:
            self.placements[rt.program] = self.placements.pop(old_program)
        log.warning("%s: port taken by another process; moving to %d", rt.name, rt.port)
        await self.sup.apply(self.programs())  # type: ignore[union-attr]

    async def suspect(self, rt: Runtime) -> None:
        """A request could not reach `rt`: look at it now rather than at the next tick."""
        infos = await self.sup.processes() if self.sup is not None else {}
        await self._observe(rt, infos.get(rt.program))
        if rt.state == State.READY and not await self._healthy(rt):
            await self._set(rt, State.UNHEALTHY, "a request could not connect")

    async def recover(self, rt: Runtime) -> bool:
        """After a refused connection: wait (bounded) until `rt` serves again; False if it won't."""
        if rt.remote:
            return False
        await self.suspect(rt)
        if rt.state != State.READY:
            try:
                await self._wait_state(rt, self.config.server.cold_start_timeout)
            except ModelUnavailable:
                return False
        return rt.state == State.READY

    async def refresh(self) -> None:
        """One look at every model (the monitor does this every second)."""
        infos: dict[str, dict[str, Any]] = {}
        if self.sup is not None:
            infos = await self.sup.processes()
        await asyncio.gather(*(self._observe(rt, infos.get(rt.program)) for rt in self._all()))

    async def _watch(self) -> None:
        while not self._closing:
            try:
                await self.refresh()
            except (OSError, ConnectionError) as e:
                if self.sup is not None and not self.sup.alive():
                    log.error("supervisord is gone (%s); shutting down", e)
                    if self.on_supervisor_lost:
                        self.on_supervisor_lost()
                    return
                log.warning("could not reach supervisord: %s", e)
            except Exception:  # never let the monitor die
                log.exception("monitor error")
            self._expire_idle()
            if time.monotonic() - self._missing_checked >= self.missing_check_interval:
                self._missing_checked = time.monotonic()
                try:
                    await self._start_downloaded()
                except Exception:  # a cache that cannot be read now is looked at again later
                    log.debug("looking for the files of missing models failed", exc_info=True)
            busy = any(rt.state in (State.STARTING, State.RESTARTING) for rt in self.runtimes.values())
            await asyncio.sleep(0.25 if busy else 1.0)

    async def _start_downloaded(self) -> None:
        """Start each `always` model that was missing once its files are there, as boot would
        have: `vllama pull` downloads in a process of its own (or files are copied into the
        cache), and such a model must not wait for a first request to come up."""
        missing = [rt for rt in self.runtimes.values()
                   if rt.always and rt.state == State.MISSING and not rt.held and not rt.queued and not rt.remote]
        for rt in missing:
            if await asyncio.to_thread(self.model_dir, rt.model) is not None:
                log.info("%s: its files are there now; starting it", rt.name)
                await self.start_model(rt)

    # --- starting and stopping -----------------------------------------------------------

    async def _start_and_wait(self, rt: Runtime, timeout: float) -> None:
        """Start `rt` and hold the start lock until it is ready or failed.

        The lock is held for as long as vLLM takes to start: two vLLMs must not profile
        one device at once. One that is not ready within `timeout` is stopped (failed),
        so that a server that hangs while starting cannot hold up every other model.
        """
        try:
            await self._start_in_turn(rt, timeout)
        finally:
            rt.queued = False  # however it ended, a later request or `vllama start` may try again

    async def _start_in_turn(self, rt: Runtime, timeout: float) -> None:
        if self.sup is None or rt.remote:
            return
        deadline = time.monotonic() + timeout
        if not await self._ensure_files(rt):
            return
        await self._port_released(rt)
        while True:
            async with self._start_lock:
                if not rt.wanted or rt.state == State.READY:
                    return
                problem = self._cannot_start(rt)
                if problem:
                    await self._set(rt, State.FAILED, problem)
                    return
                no_room = await self._place(rt)
                if no_room is None:
                    break
                if placement.is_lasting(no_room):
                    await self._set(rt, State.FAILED, f"does not fit: {no_room}")
                    return
            # Wait (bounded) for memory: a model may go idle and become evictable.
            if time.monotonic() > deadline:
                rt.wanted = False
                await self._set(rt, State.STOPPED, f"not enough memory: {no_room}")
                return
            await self._set(rt, State.STARTING, f"waiting for memory: {no_room}")
            await asyncio.sleep(1.0)
        async with self._start_lock:
            if not rt.wanted or rt.state == State.READY:
                return
            await self.sup.apply(self.programs())  # its program now carries its budget
            if not rt.wanted:
                return  # stopped by an admin while supervisord took the update
            if rt.queued or rt.state in (State.STOPPED, State.FAILED, State.MISSING):
                rt.queued = False
                if self.metrics is not None:
                    self.metrics.action("start", "always" if rt.always else "on_demand")
                await self._set(rt, State.STARTING, "starting")
                await self._launch(rt, timeout)
            else:
                await self._wait_state(rt, timeout)

    async def _launch(self, rt: Runtime, timeout: float) -> None:
        """Under the start lock: start `rt`'s server and wait until it is ready or failed.

        supervisord restarts nothing itself (``autorestart=false``): a server that exits
        while it starts is started again here, after a pause that grows with each try,
        until `_crashed` gives up (engine.startretries), and one that crashes later is
        restarted through `_restart`, in its turn. So no restart ever overlaps another
        model's start. One not ready within `timeout` is stopped (failed): a server that
        hangs while starting must not hold up every other model.
        """
        deadline = time.monotonic() + timeout
        rt.launching = True
        try:
            while True:
                rt.start_requested = time.monotonic()
                await self.sup.start(rt.program)  # type: ignore[union-attr]
                exit_ = await self._until_started(rt, deadline)
                if exit_ is None:
                    return
                if rt.pid is not None:
                    reap_group(rt.pid)
                    rt.pid = None
                if await self._crashed(rt, exit_, starting=True):
                    return
                await asyncio.sleep(min(rt.failed_starts, 5))
                if not rt.wanted:
                    return
        except ModelUnavailable:
            reason = self.failure_reason(rt, f"not ready after {timeout:.0f}s (server.cold_start_timeout); stopped")
            await self._stop(rt, "cold_start_timeout")
            await self._set(rt, State.FAILED, reason)
            raise
        finally:
            rt.launching = False

    async def _until_started(self, rt: Runtime, deadline: float) -> str | None:
        """Wait for `rt` to be ready, failed or unwanted (None), or for its process to exit
        (what supervisord says of the exit). ModelUnavailable at `deadline`."""
        while True:
            if rt.state in (State.READY, State.FAILED, State.MISSING) or not rt.wanted:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise ModelUnavailable(f'model "{rt.name}" is still {rt.state.value}: {rt.reason}', retry_after=30)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, left)), rt.changed:
                    await rt.changed.wait()
            info = (await self.sup.processes()).get(rt.program)  # type: ignore[union-attr]
            if info is not None and info["statename"] in ("BACKOFF", "EXITED", "FATAL") and rt.wanted:
                return await self._exit_what(rt, info)

    async def _port_released(self, rt: Runtime) -> None:
        """A model with a fixed port starts once the server it replaces has let go of the port."""
        while rt.model.port is not None and any(r is not rt and r.port == rt.port for r in self.retiring):
            await asyncio.sleep(0.2)

    async def _ensure_files(self, rt: Runtime) -> bool:
        """Make sure a Hub model is in the cache: download it (auto_pull) or mark it missing.

        Runs outside the start lock: a long download must not hold up other models.
        """
        m = rt.model
        if is_local_source(m.source):
            return True
        snap = await asyncio.to_thread(hub.local_snapshot, m.source, m.revision)
        if snap is not None and snap.complete:
            return True
        if not m.auto_pull:
            rt.wanted = False
            await self._set(rt, State.MISSING, f"{m.source} is not downloaded; run `vllama pull {m.name}`")
            return False
        repo, revision = hub.parse_ref(m.source)
        await self._set(rt, State.STARTING, f"downloading {m.source}")
        last = [0.0]

        def progress(ev: hub.Progress) -> None:
            if ev.kind == "file" and time.monotonic() - last[0] > 5:
                last[0] = time.monotonic()
                log.info("%s: pulling %s: %s / %s", m.name, ev.file, hub.human_bytes(ev.completed or 0),
                         hub.human_bytes(ev.total or 0))

        cancel = threading.Event()
        try:
            await asyncio.to_thread(hub.pull, repo, m.revision or revision, on_progress=progress, cancel=cancel)
        except asyncio.CancelledError:
            cancel.set()  # the download stops after its current chunk (partial files stay for a resume)
            raise
        except hub.PullError as e:
            rt.wanted = False
            await self._set(rt, State.FAILED, f"download of {m.source} failed: {e.message}")
            return False
        log.info("%s: %s downloaded", m.name, m.source)
        return True

    # --- memory: placement and eviction ---------------------------------------------------

    def model_dir(self, model: Model) -> Path | None:
        """The model's files on disk (a local source, or its complete snapshot in the HF cache)."""
        if is_local_source(model.source):
            return Path(self.config.source_path(model))
        snap = hub.local_snapshot(model.source, model.revision)
        return snap.path if snap is not None and snap.complete else None

    def _facts(self, model: Model) -> placement.ModelFacts | None:
        d = self.model_dir(model)
        return placement.ModelFacts.from_dir(d) if d is not None and d.is_dir() else None

    def _our_pids(self) -> set[int]:
        return gpu.process_tree(rt.pid for rt in self.runtimes.values() if rt.pid)

    def _plan(self, models: list[Model], running: dict[str, placement.Placement] | None = None) -> placement.Plan:
        with self.inventory() as inv:
            return placement.plan(models, inv, reserve_gb=self.config.server.reserve_gb,
                                  our_pids=self._our_pids(), running=running or {}, facts=self._facts,
                                  cpu_models=placement.cpu_models(self.config))

    async def _place(self, rt: Runtime) -> str | None:
        """Give `rt` its budget, evicting idle on-demand models if needed; None when placed.

        Never evicts a model with requests in flight or waiting, nor an `always` one.
        """
        if rt.program in self.placements:
            return None
        plan = await asyncio.to_thread(self._plan, [rt.model], dict(self.placements))
        if plan.fits(rt.name):
            self.placements[rt.program] = plan.placements[rt.name]
            return None
        problem = "; ".join(plan.refused.get(rt.name, [])) or f"{rt.name} does not fit"
        idle = sorted((r for r in self.runtimes.values()
                       if r is not rt and not r.always and not r.remote and r.program in self.placements
                       and r.inflight == 0 and r.waiting == 0 and r.state != State.STARTING),
                      key=lambda r: r.last_used)
        victims = await asyncio.to_thread(self._evictable, rt.model, [r.program for r in idle], dict(self.placements))
        if not victims:
            return problem
        by_program = {r.program: r for r in idle}
        for program in victims:
            await self._stop(by_program[program], f"evicted to make room for {rt.name}")
            self.evictions += 1
            if self.metrics is not None:
                self.metrics.evicted(by_program[program].name)
        plan = await asyncio.to_thread(self._plan, [rt.model], dict(self.placements))
        if plan.fits(rt.name):
            self.placements[rt.program] = plan.placements[rt.name]
            return None
        return "; ".join(plan.refused.get(rt.name, [])) or problem

    def _evictable(self, model: Model, idle: list[str], running: dict[str, placement.Placement]) -> list[str] | None:
        with self.inventory() as inv:
            return placement.evictable(model, inv, idle, running=running, reserve_gb=self.config.server.reserve_gb,
                                       our_pids=self._our_pids(), facts=self._facts)

    def memory(self, rt: Runtime) -> tuple[int | None, int | None, list[str]]:
        """(measured bytes, budget bytes, devices) for `vllama ps`."""
        p = self.placements.get(rt.program)
        if p is None:
            return None, None, []
        devices = [f"gpu{i}" for i in p.gpus] or [f"cpu {format_cpu_list(p.cpus)}" if p.cpus else "cpu"]
        if not rt.pid:
            return None, p.total_budget, devices
        with self.inventory() as inv:
            u = placement.usage(p, [rt.pid], inv)
        return u.measured_bytes, u.budget_bytes, devices

    def _cannot_start(self, rt: Runtime) -> str | None:
        """A reason known before launching (vLLM would take many seconds to say the same)."""
        if is_local_source(rt.model.source):
            path = Path(self.config.source_path(rt.model))
            if not (path / "config.json").is_file():
                what = "does not exist" if not path.exists() else "has no config.json"
                return f"model source {path} {what}"
        return None

    async def _wait_state(self, rt: Runtime, timeout: float) -> None:
        def settled() -> bool:
            return rt.state in (State.READY, State.FAILED, State.MISSING) or not rt.wanted

        try:
            async with asyncio.timeout(timeout):
                async with rt.changed:
                    await rt.changed.wait_for(settled)
        except TimeoutError:
            raise ModelUnavailable(
                f'model "{rt.name}" is still {rt.state.value} after {timeout:.0f}s: {rt.reason}', retry_after=30
            ) from None

    async def start_model(self, rt: Runtime) -> None:
        """Ask for `rt` to run; returns at once (requests and `vllama ps` see it start)."""
        rt.held = False
        if rt.remote or rt.state == State.READY:
            return
        rt.wanted = True
        rt.failed_starts = 0
        if rt.state in (State.STOPPED, State.FAILED, State.MISSING) and not rt.queued:
            rt.queued = True
            await self._set(rt, State.STARTING, "waiting for its turn (models start one at a time)")
            self._spawn(self._start_and_wait(rt, self.config.server.cold_start_timeout))

    async def stop_model(self, rt: Runtime, reason: str, *, hold: bool = False) -> None:
        """Stop `rt` (its whole process group). With `hold`, requests do not restart it.

        Waits while another model starts: a vLLM profiling its GPU takes memory that another
        server frees meanwhile for its own (its KV cache then comes out wrong, or it fails).
        Its requests in flight do not wait for that: they are ended at once (`_end_requests`).
        """
        if self.sup is None or rt.remote:
            return
        if rt.pid is None and not rt.launching:
            await self._stop(rt, reason, hold=hold)  # no process (waiting its turn, or down): nothing to free
            return
        if self._start_lock.locked():
            await self._end_requests(rt, reason, hold=hold)
        async with self._start_lock:
            await self._stop(rt, reason, hold=hold)

    async def _end_requests(self, rt: Runtime, reason: str, *, hold: bool) -> None:
        """What a stop does at once for clients while its process stop waits for the start lock
        (another model's start, up to cold_start_timeout): no new request reaches the server,
        and those in flight end now with the stop's note, not when the other start is done."""
        rt.wanted = False
        rt.held = hold
        await self._set(rt, State.STOPPING, f"{reason} (waiting for another model's start to finish)")
        rt.interrupt(self._stop_note(rt, reason, hold))
        if rt.inflight and rt.port is not None:
            cut = await asyncio.to_thread(sever_connections, rt.port)
            log.info("%s: cut %d connection(s) to it, %d request(s) in flight (%s)", rt.name, cut, rt.inflight, reason)

    @staticmethod
    def _stop_note(rt: Runtime, reason: str, hold: bool) -> str:
        return stop_note(rt.name, "vllama stop" if hold else reason)

    async def _stop(self, rt: Runtime, reason: str, *, hold: bool = False) -> None:
        """`stop_model` for a caller that holds the start lock."""
        if self.sup is None or rt.remote:
            return
        rt.wanted = False
        rt.held = hold
        if rt.state == State.STOPPED and rt.pid is None and not rt.launching:
            await self._set(rt, State.STOPPED, reason)  # nothing runs: no stop to make, nor to count
            return
        # Not ready from here on: a request now waits for the model to start again rather
        # than reach a server that supervisord is stopping.
        await self._set(rt, State.STOPPING, reason)
        if self.metrics is not None:
            self.metrics.action("stop", "admin" if hold else reason.split(" ")[0])
        await self._stop_process(rt, self._stop_note(rt, reason, hold))
        if rt.pid is not None:
            reap_group(rt.pid, stopped=True)
        rt.pid = None
        if not rt.always:
            self.placements.pop(rt.program, None)  # its memory is free for others
        await self._set(rt, State.STOPPED, reason)
        if rt.wanted and self.runtimes.get(rt.name) is rt:
            await self.start_model(rt)  # a request came while it stopped

    async def _stop_process(self, rt: Runtime, note: str) -> None:
        """supervisord's stop of `rt`, cutting the connections of its requests in flight,
        which are told `note` rather than that the server closed the connection
        (`Lease.explain`).

        vLLM aborts its engine on SIGTERM, but its HTTP server then waits for every open
        connection to close, and a stream of the aborted engine never ends: the stop
        would take engine.stopwaitsecs (until SIGKILL) and the client's stream would stall
        as long. So while supervisord stops it, our connections to it are cut, again
        each `SEVER_EVERY` (a request resent on a fresh connection is cut too): the
        streams end at once with an error line and the server exits. A reload's removal
        drains first (`_drain`, up to server.shutdown_grace): what is cut here is what
        outlived the drain.
        """
        rt.interrupt(note)
        stop = asyncio.ensure_future(self.sup.stop(rt.program))  # type: ignore[union-attr]
        try:
            while not stop.done():
                inflight = rt.inflight
                if inflight and rt.port is not None:
                    cut = await asyncio.to_thread(sever_connections, rt.port)
                    if cut:
                        log.info("%s: cut %d connection(s) to it, %d request(s) in flight (%s)",
                                 rt.name, cut, inflight, rt.reason)
                await asyncio.wait([stop], timeout=SEVER_EVERY)
        finally:
            if not stop.done():
                stop.cancel()
        await stop

    async def _stop_idle(self, rt: Runtime, reason: str) -> None:
        """Stop an idle model (keep_alive), unless a request came since it was found idle."""
        async with self._start_lock:
            if rt.state == State.READY and rt.inflight == 0 and rt.waiting == 0:
                await self._stop(rt, reason)

    async def restart_model(self, rt: Runtime) -> None:
        """Stop and start `rt`; a model whose saved change did not start gets that change instead.

        A restart is what an operator does to make a model run what the file says: restarting
        the previous configuration would leave the file and the server disagreeing, and the
        next `vllama serve` would fail the model. So the change is tried again as a reload
        does, rolling: the old server serves until the new one is ready, and stays if it
        fails again. While the change is being tried, a restart adds nothing.
        """
        if rt.pending is not None and self.runtimes.get(rt.name) is rt:
            await self._retry_change(rt)
            return
        await self.stop_model(rt, "restart requested")
        rt.wanted = True
        await self.start_model(rt)

    async def _retry_change(self, rt: Runtime) -> None:
        """Start `rt`'s pending definition beside it again, as the reload that saved it did."""
        async with self._reload_lock:
            if rt.pending is None or rt.pending_error is None:
                return  # being tried now
            rt.pending_error = None
            generation = self._generation[rt.name] = self._generation.get(rt.name, 0) + 1
            log.info("%s: restart requested: trying its saved configuration again beside the serving one", rt.name)
            self._spawn(self._replace(rt, rt.pending, generation))

    # --- reload ----------------------------------------------------------------------

    async def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply a new registry: start what is new, drain and stop what is gone,
        restart what changed, leave the rest alone (same process, no failed request).

        The new registry's placement is checked first; if it does not fit, nothing
        changes and ReloadRejected says why. Aliases, keep_alive, load policy and
        queue size apply at once without a restart. A changed model is restarted
        rolling when memory allows (the old server serves until the new is ready),
        else drained and swapped.
        """
        async with self._reload_lock:
            d = diff(self.config, new, self._serving())
            keep = {rt.program: self.placements[rt.program] for name, rt in self.runtimes.items()
                    if name not in d["changed"] and name not in d["removed"] and rt.program in self.placements}
            place = [new.lookup(n) for n in d["added"] + d["changed"]]
            place = [m for m in place if m is not None and m.load == "always" and not m.url
                     and self.model_dir(m) is not None]
            plan = await asyncio.to_thread(self._plan_with, new, place, keep)
            if plan.problems:
                raise ReloadRejected(plan.problems)
            self.config = new
            for name in d["changed"] + d["removed"]:
                self._generation[name] = self._generation.get(name, 0) + 1
            self._track_pending(new, d)
            for name in d["updated"]:
                rt = self.runtimes[name]
                rt.model = new.lookup(name)  # type: ignore[assignment]
                rt.launch = new
                rt.keep_alive = parse_duration(rt.model.keep_alive)
                if rt.always and rt.state == State.STOPPED and not rt.held:
                    await self.start_model(rt)  # on_demand → always
            for name in d["removed"]:
                self._spawn(self._retire(self.runtimes.pop(name), "removed from the registry"))
            for name in d["added"]:
                rt = self.runtimes[name] = self._runtime_for(new.lookup(name))  # type: ignore[arg-type]
                if rt.always and not rt.remote:
                    await self.start_model(rt)
            for name in d["changed"]:
                self._spawn(self._replace(self.runtimes[name], new.lookup(name), self._generation[name]))  # type: ignore[arg-type]
            if self.sup is not None:
                await self.sup.apply(self.programs())
            self.reload_error = None
            log.info("reload applied: %s", {k: v for k, v in d.items() if v and k != "unchanged"})
            return d

    def _serving(self) -> dict[str, tuple[Config, Model]]:
        """What each model whose saved change did not start still serves (see `diff`)."""
        return {name: (rt.launch, rt.model) for name, rt in self.runtimes.items() if rt.pending_error is not None}

    def _track_pending(self, new: Config, d: dict[str, list[str]]) -> None:
        """Note on each changed model's server the definition that is to replace it; forget a
        failed change that the file no longer asks for (it now says what serves)."""
        for name in d["changed"]:
            if (rt := self.runtimes.get(name)) is not None:
                rt.pending, rt.pending_error = new.lookup(name), None
        for name in d["unchanged"] + d["updated"]:
            if (rt := self.runtimes.get(name)) is not None and rt.pending_error is not None:
                rt.pending = rt.pending_error = None

    def failed_changes(self) -> dict[str, str]:
        """Model → why its saved configuration did not start while its previous one serves on."""
        return {name: rt.pending_error for name, rt in self.runtimes.items() if rt.pending_error is not None}

    async def reload_file(self) -> dict[str, Any]:
        """Re-read models.yaml; an invalid or unfitting file changes nothing and is reported."""
        path = self.config.path
        try:
            new = await asyncio.to_thread(load_settled, path)
            d = await self.reload(new)
        except ConfigError as e:
            self.reload_error = "invalid registry: " + "; ".join(e.problems)
        except ReloadRejected as e:
            self.reload_error = "the new registry does not fit: " + "; ".join(e.problems)
        else:
            return {"applied": True, "error": None, "changes": d}
        log.error("reload of %s rejected, still serving the previous registry: %s", path, self.reload_error)
        return {"applied": False, "error": self.reload_error, "changes": None}

    def _plan_with(self, config: Config, models: list[Model], running: dict[str, placement.Placement]) -> placement.Plan:
        with self.inventory(config) as inv:
            return placement.plan(models, inv, reserve_gb=config.server.reserve_gb,
                                  our_pids=self._our_pids(), running=running, facts=self._facts,
                                  cpu_models=placement.cpu_models(config))

    async def _drain(self, rt: Runtime, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while rt.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if rt.inflight:
            log.warning("%s: %d requests still running after %gs (server.shutdown_grace); stopping anyway",
                        rt.name, rt.inflight, timeout)

    def _retire(self, rt: Runtime, reason: str) -> Coroutine[Any, Any, None]:
        """Let `rt`'s requests finish (bounded by shutdown_grace), then stop it and drop its program.

        `rt` joins `retiring` at once, not when the returned coroutine first runs: a
        supervisord update applied in between (the reload's own) must still see its
        program, or supervisord would stop it with its requests in flight.
        """
        self.retiring.append(rt)
        return self._drain_and_stop(rt, reason)

    async def _drain_and_stop(self, rt: Runtime, reason: str) -> None:
        try:
            await self._drain(rt, self.config.server.shutdown_grace)
            await self.stop_model(rt, reason)
            self.placements.pop(rt.program, None)
        finally:
            self.retiring.remove(rt)
            if self.sup is not None:
                await self.sup.apply(self.programs())

    async def _replace(self, old: Runtime, model: Model, generation: int) -> None:
        """Restart a changed model: rolling when it was serving and a second server fits.

        A later reload that changes or removes the model again supersedes this one
        (`_generation`): a server started for a superseded registry is stopped, never swapped in.
        """
        def current() -> bool:
            return self._generation.get(model.name) == generation

        if not current():
            return
        new = self._runtime_for(model)
        serving = old.state in (State.READY, State.UNHEALTHY, State.STARTING) and not old.remote
        rolling = serving and model.port is None and old.always
        if rolling:
            plan = await asyncio.to_thread(self._plan, [model], dict(self.placements))
            rolling = plan.fits(model.name) and current()
            if rolling:
                self.placements[new.program] = plan.placements[model.name]
        if rolling:
            # The old server keeps serving while the new one starts beside it.
            self.retiring.append(new)
            try:
                await self.start_model(new)
                await self._wait_state(new, self.config.server.cold_start_timeout)
            except ModelUnavailable:
                pass
            finally:
                self.retiring.remove(new)
            if new.state == State.READY and current():
                self.runtimes[model.name] = new
                await self._retire(old, "replaced by its new configuration")
                return
            if current():
                log.warning("%s: new configuration did not start (%s); keeping the old server, and the change "
                            "pending (a reload or `vllama restart` tries it again)", model.name, new.reason)
                old.pending_error = new.reason
            await self.stop_model(new, "replacement failed" if current() else "superseded by a later reload")
            self.placements.pop(new.program, None)
            if self.sup is not None:
                await self.sup.apply(self.programs())
            return
        if not current():
            return
        # Drain then swap: new requests wait for the new server.
        self.runtimes[model.name] = new
        await self._retire(old, "restarting with its new configuration")
        if current() and (new.always or serving):
            await self.start_model(new)

    # --- requests --------------------------------------------------------------------

    async def acquire(self, name: str, keep_alive: float | None = None, endpoint: str = "") -> Lease:
        """Wait (bounded) until the model `name` can serve, and count the request in flight.

        Raises ModelNotFound (404) or ModelUnavailable (503: failed, queue full, timeout).
        """
        try:
            lease = await self._acquire(name, keep_alive)
        except ModelNotFound:
            if self.metrics is not None:
                self.metrics.started("unknown", endpoint).finished(404)
            raise
        except ModelUnavailable:
            if self.metrics is not None:
                self.metrics.started(self.get(name).name, endpoint).finished(503)
            raise
        if self.metrics is not None:
            lease.tracker = self.metrics.started(lease.runtime.name, endpoint)
        return lease

    async def _acquire(self, name: str, keep_alive: float | None) -> Lease:
        rt = self.get(name)
        if rt.held:
            raise ModelUnavailable(f'model "{rt.name}" was stopped by an admin; `vllama start {rt.name}` serves it again')
        if rt.state != State.READY:
            if self._shutdown.is_set():
                raise ModelUnavailable(shutting_down(rt))
            # A failed `always` model, or one that crash-looped, stays failed until an admin
            # starts it; an on-demand model whose start was refused is tried again.
            if rt.state == State.FAILED and (rt.always or not rt.wanted):
                raise ModelUnavailable(f'model "{rt.name}" failed: {rt.reason}')
            if rt.waiting >= rt.model.max_queue:
                raise ModelUnavailable(
                    f'model "{rt.name}" is {rt.state.value}: {rt.waiting} requests already waiting', retry_after=5
                )
            rt.waiting += 1
            try:
                await self.start_model(rt)
                await self._wait_for_start(rt)
            finally:
                rt.waiting -= 1
            if rt.state == State.FAILED:
                raise ModelUnavailable(f'model "{rt.name}" failed: {rt.reason}')
            if rt.state == State.MISSING:
                raise ModelNotFound(rt.name, rt.reason)
            if rt.state != State.READY:
                raise ModelUnavailable(f'model "{rt.name}" is {rt.state.value}: {rt.reason}', retry_after=5)
        rt.inflight += 1
        rt.last_used = time.monotonic()
        rt.keep_alive = self._keep_alive_for(rt, keep_alive)
        return Lease(self, rt, keep_alive)

    async def _wait_for_start(self, rt: Runtime) -> None:
        """A request's wait for `rt` to start (`_wait_state`), cut short by `begin_shutdown`."""
        started = asyncio.ensure_future(self._wait_state(rt, self.config.server.cold_start_timeout))
        shutdown = asyncio.ensure_future(self._shutdown.wait())
        try:
            await asyncio.wait([started, shutdown], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (started, shutdown):
                t.cancel()
            await asyncio.gather(started, shutdown, return_exceptions=True)
        if not started.cancelled():
            started.result()  # ModelUnavailable after cold_start_timeout
        elif rt.state != State.READY:
            raise ModelUnavailable(shutting_down(rt))

    @staticmethod
    def _keep_alive_for(rt: Runtime, requested: float | None) -> float:
        """How long `rt` stays loaded after its requests end, as the latest request says.

        As in Ollama, each request sets it anew: its own keep_alive, or, without one, the
        model's configured keep_alive, never an earlier request's (one `keep_alive: 0`
        would otherwise unload the model after every later request).
        """
        return requested if requested is not None else parse_duration(rt.model.keep_alive)

    def _release(self, lease: Lease) -> None:
        rt = lease.runtime
        rt.inflight -= 1
        rt.last_used = time.monotonic()
        rt.expires_at = None if rt.always or rt.keep_alive == FOREVER else time.time() + rt.keep_alive
        if rt.inflight == 0 and not rt.always and rt.keep_alive == 0:
            self._spawn(self._stop_idle(rt, "keep_alive 0"))

    def _expire_idle(self) -> None:
        now = time.time()
        for rt in self.runtimes.values():
            if (not rt.always and not rt.remote and rt.state == State.READY and rt.inflight == 0
                    and rt.expires_at is not None and rt.expires_at <= now):
                rt.expires_at = None
                self._spawn(self._stop_idle(rt, f"idle for keep_alive ({rt.keep_alive:g}s)"))
