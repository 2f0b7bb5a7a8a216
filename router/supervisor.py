"""supervisord: the process manager that runs one vLLM server per model.

We generate supervisord's configuration from the registry, start supervisord
on a private unix socket (or attach to one that runs us), and drive it over
its XML-RPC interface. supervisord stays the source of truth for process
state; readiness (vLLM's ``/health``) is the lifecycle module's business.

Every argument from ``models.yaml`` reaches vLLM as one argv element: the
``command=`` line is written with POSIX quoting that survives supervisord's
own parsing (``%`` expansion, ``;``/``#`` inline comments), and the tests
round-trip hostile arguments through supervisor's real parser.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import http.client
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from supervisor.xmlrpc import SupervisorTransport

from .carry import SOCKET_NAME, arg_problem, env_value_problem, is_env_name, state_dir_problem

log = logging.getLogger("vllama.supervisor")

# supervisord process states (supervisor.states.ProcessStates).
STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL, UNKNOWN = 0, 10, 20, 30, 40, 100, 200, 1000

#: Set in every child's environment so that leftovers of a SIGKILLed router can
#: be found by their state dir, even once they have been re-parented to init.
STATE_ENV = "VLLAMA_STATE_DIR"


class SupervisorError(Exception):
    """supervisord could not be started, reached, or asked to do something."""


@dataclass(frozen=True)
class Paths:
    """The runtime directory layout. The directory is 0700: the socket gives full control."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "supervisord.conf"

    @property
    def socket(self) -> Path:
        return self.root / SOCKET_NAME

    @property
    def pidfile(self) -> Path:
        return self.root / "supervisord.pid"

    @property
    def lock(self) -> Path:
        return self.root / "vllama.lock"

    @property
    def programs(self) -> Path:
        return self.root / "programs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, program: str) -> Path:
        return self.logs / f"{program}.log"

    def program_file(self, program: str) -> Path:
        return self.programs / f"{program}.conf"

    def create(self) -> None:
        if problem := state_dir_problem(str(self.root)):
            raise SupervisorError(f"state dir {self.root} {problem}")
        for d in (self.root, self.programs, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "vllama"


# --- configuration -------------------------------------------------------------


def quote_arg(arg: str) -> str:
    """Quote one argv element for supervisord's ``command=``.

    supervisord expands ``%(...)s`` (so ``%`` becomes ``%%``) and its config parser
    cuts a line at ``;`` or ``#`` after whitespace even inside quotes; closing and
    reopening the quote (``'a '';b'``) puts a quote character before it instead.
    What cannot be carried at all (`carry.arg_problem`) is refused: config refuses it first.
    """
    if problem := arg_problem(arg):
        raise ValueError(f"argument {arg!r}: {problem}")
    q = shlex.quote(arg)
    q = re.sub(r"(\s)([;#])", r"\1''\2", q)
    return q.replace("%", "%%")


def quote_env(env: Mapping[str, str]) -> str:
    """``environment=`` value; supervisord splits it with a non-POSIX shlex.

    Names and values it cannot carry (`carry`) are refused: config refuses them first.
    """
    parts = []
    for k, v in env.items():
        if not is_env_name(k):
            raise ValueError(f"invalid environment variable name {k!r}")
        if problem := env_value_problem(v):
            raise ValueError(f"environment value of {k} {problem}: {v!r}")
        parts.append(f'{k}="{v.replace("%", "%%")}"')
    return ",".join(parts)


@dataclass(frozen=True)
class Program:
    """One supervisord program: a vLLM server for one model."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    stopwaitsecs: int = 20
    autostart: bool = False
    nice: int = 0
    """Run under nice(1) at this value: supervisord has no option for it."""

    @property
    def command(self) -> tuple[str, ...]:
        if not self.nice:
            return self.argv
        return (shutil.which("nice") or "nice", "-n", str(self.nice), *self.argv)

    def render(self, paths: Paths) -> str:
        """The ``[program:x]`` section. Stable for equal inputs, so reloads see no change."""
        log = paths.log(self.name)
        env = {**self.env, STATE_ENV: str(paths.root)}
        lines = [
            f"[program:{self.name}]",
            "command=" + " ".join(quote_arg(a) for a in self.command),
            f"environment={quote_env(dict(sorted(env.items())))}",
            f"directory={paths.root}",
            f"autostart={'true' if self.autostart else 'false'}",
            # The router restarts a server that exits, in its turn (two vLLMs must not
            # start on one GPU at once) and counting vLLM's late failures: see
            # lifecycle.Fleet._launch. supervisord's own retries would do neither.
            "autorestart=false",
            "startretries=0",
            # RUNNING only means "alive this long"; readiness is vLLM's /health.
            "startsecs=5",
            "stopsignal=TERM",
            f"stopwaitsecs={self.stopwaitsecs}",
            # vLLM forks EngineCore and worker processes: signal the whole group.
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={log}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
            "",
        ]
        return "\n".join(lines)


def render_main_conf(paths: Paths, include: Sequence[Path] = ()) -> str:
    includes = " ".join(str(p) for p in (paths.programs / "*.conf", *include))
    return "\n".join(
        [
            "; Generated by vllama serve; edits are overwritten.",
            "[unix_http_server]",
            f"file={paths.socket}",
            "chmod=0700",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={paths.logs / 'supervisord.log'}",
            "logfile_maxbytes=10MB",
            f"pidfile={paths.pidfile}",
            f"childlogdir={paths.logs}",
            f"directory={paths.root}",
            "",
            "[include]",
            f"files = {includes}",
            "",
        ]
    )


def write_programs(paths: Paths, programs: Sequence[Program]) -> None:
    """Make ``programs/`` hold exactly these programs; unchanged files are not touched."""
    wanted = {paths.program_file(p.name): p.render(paths) for p in programs}
    for f in paths.programs.glob("*.conf"):
        if f not in wanted:
            f.unlink()
    for f, text in wanted.items():
        if not f.exists() or f.read_text() != text:
            tmp = f.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(f)


# --- the supervisord process and its RPC -----------------------------------------


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc Linux: supervisord then outlives a SIGKILLed vllama (kill_stale cleans up)
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, between fork and exec: get SIGTERM if vllama dies, even by SIGKILL.

    One syscall through a libc loaded beforehand: a forked child of a threaded process
    must not take locks (loading a library would).
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[union-attr]


class Supervisor:
    """XML-RPC client for one supervisord, serialised onto a worker thread.

    The transport keeps one connection and is not thread-safe, so every call
    goes through one lock; calls run in a thread so the event loop never blocks.
    """

    def __init__(self, paths: Paths, process: subprocess.Popen[bytes] | None = None) -> None:
        self.paths = paths
        self.process = process
        self._lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()
        self._proxy = self._make_proxy()

    def _make_proxy(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.paths.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport, allow_none=True)

    # lifecycle of supervisord itself

    @classmethod
    def spawn(cls, paths: Paths, *, timeout: float = 20.0) -> Supervisor:
        """Start supervisord as our child in its own process group, and wait for its socket."""
        paths.create()
        paths.conf.write_text(render_main_conf(paths))
        cmd = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(paths.conf)]
        env = {**os.environ, STATE_ENV: str(paths.root)}
        # A process group of its own keeps a terminal's Ctrl-C for vllama alone (which then
        # stops supervisord in order). The same session, though: Linux's autogroup scheduler
        # shares the CPU fairly between sessions, so vLLM in a session of its own would
        # compete with the router as an equal whatever its nice value (engine.nice).
        with open(paths.logs / "supervisord.out", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    process_group=0,
                                    preexec_fn=_die_with_parent if _LIBC else None)  # noqa: PLW1509 - one syscall
        sup = cls(paths, proc)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if sup._call_sync("supervisor.getState")["statecode"] == 1:
                    return sup
            except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
                pass
            if proc.poll() is not None:
                raise SupervisorError(f"supervisord exited with {proc.returncode}; see {paths.logs}/supervisord.out")
            if time.monotonic() > deadline:
                proc.kill()
                raise SupervisorError("supervisord did not open its socket in time")
            time.sleep(0.05)

    @classmethod
    def attach(cls, paths: Paths) -> Supervisor:
        """Use a supervisord that is already running (the deployment where it runs us)."""
        sup = cls(paths)
        try:
            sup._call_sync("supervisor.getState")
        except (OSError, xmlrpc.client.Fault) as e:
            raise SupervisorError(f"cannot reach supervisord at {paths.socket}: {e}") from None
        return sup

    def alive(self) -> bool:
        """Whether supervisord still runs: our child's exit status, or (attached) one call on a
        connection of its own, since the shared one may be in use by a call on a worker thread."""
        if self.process is not None:
            return self.process.poll() is None
        try:
            self._make_proxy().supervisor.getState()
            return True
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return False

    # RPC

    def _call_sync(self, method: str, *args: Any) -> Any:
        fn = self._proxy
        for part in method.split("."):
            fn = getattr(fn, part)
        try:
            return fn(*args)
        except (OSError, xmlrpc.client.ProtocolError, http.client.HTTPException):
            # A broken connection poisons the transport: use a fresh one next time.
            self._proxy = self._make_proxy()
            raise

    async def call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call at a time over the one connection.

        A cancelled caller (a background task stopped at shutdown) cannot stop the thread
        its call runs on; the lock is held until that thread is done with the connection,
        or the next call (shutdown's own) would write into a half-finished request.
        """
        async with self._lock:
            call = asyncio.ensure_future(asyncio.to_thread(self._call_sync, method, *args))
            try:
                return await asyncio.shield(call)
            except asyncio.CancelledError:
                await asyncio.wait([call])
                raise

    async def processes(self) -> dict[str, dict[str, Any]]:
        """name → supervisord's process info (state, pid, start, exitstatus, spawnerr…)."""
        infos = await self.call("supervisor.getAllProcessInfo")
        return {i["name"]: i for i in infos}

    async def apply(self, programs: Sequence[Program]) -> tuple[list[str], list[str], list[str]]:
        """Write program files and apply them like ``supervisorctl update``.

        Returns (added, changed, removed). Changed and removed groups are stopped
        first; nothing is started here (models start in order, see lifecycle).
        One apply runs at a time: two interleaved would both see a group as removed
        and the second would fail removing it.
        """
        async with self._apply_lock:
            write_programs(self.paths, programs)
            [[added, changed, removed]] = await self.call("supervisor.reloadConfig")
            for name in removed:
                await self._stop_quietly(name)
                await self.call("supervisor.removeProcessGroup", name)
            for name in changed:
                await self._stop_quietly(name)
                await self.call("supervisor.removeProcessGroup", name)
                await self.call("supervisor.addProcessGroup", name)
            for name in added:
                await self.call("supervisor.addProcessGroup", name)
            return added, changed, removed

    async def start(self, name: str) -> None:
        try:
            await self.call("supervisor.startProcess", name, False)
        except xmlrpc.client.Fault as e:
            if "ALREADY_STARTED" not in e.faultString:
                raise

    async def stop(self, name: str) -> None:
        await self._stop_quietly(name)

    async def _stop_quietly(self, name: str) -> None:
        try:
            await self.call("supervisor.stopProcess", name, True)
        except xmlrpc.client.Fault as e:
            if "NOT_RUNNING" not in e.faultString and "BAD_NAME" not in e.faultString:
                raise

    async def kill(self, name: str) -> int | None:
        """SIGKILL `name`'s whole process group now, with no SIGTERM and no engine.stopwaitsecs.

        For a vLLM that is still initialising, which ignores SIGTERM: a stop would wait
        stopwaitsecs for nothing. supervisord makes each program a process-group leader, so the
        group is the leader's pid, and killing the group takes its EngineCore and workers with it
        (none is left orphaned). supervisord sees the exit as a crash; it restarts nothing
        (autorestart=false). Returns the pid killed; None if it was not running or supervisord
        could not be asked (the caller is shutting down: `kill_stale` finds what is left).
        """
        try:
            info = await self.call("supervisor.getProcessInfo", name)
        except (OSError, xmlrpc.client.Error, http.client.HTTPException) as e:
            if not (isinstance(e, xmlrpc.client.Fault) and "BAD_NAME" in e.faultString):
                log.warning("could not ask supervisord for %s's process to kill it: %s", name, e)
            return None
        pid = info.get("pid") or 0
        if info.get("statename") not in ("STARTING", "RUNNING", "STOPPING") or pid <= 0:
            return None
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return int(pid)

    async def exit_cause(self, name: str, info: Mapping[str, Any] | None) -> str | None:
        """How `name`'s last process ended: "exit status 1", "killed by SIGKILL", or the
        reason it could not be spawned; None if `info` shows no exit.

        getProcessInfo has the exit status but, for a signal, only -1 (its `description`
        of an exited process is the time it stopped), and for an exit within startsecs
        only "Exited too quickly": then the line supervisord logs for the exit says how,
        read from its own log.
        """
        cause = exit_status(info)
        if cause != KILLED_BY_A_SIGNAL and not (cause or "").startswith(EXITED_TOO_QUICKLY):
            return cause
        try:
            text = await self.call("supervisor.readLog", -LOG_READ_BYTES, 0)
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return cause
        return logged_exit(str(text), name) or cause

    async def stop_all(self) -> None:
        """Stop every program; a supervisord that cannot be reached is not an error here
        (the caller then stops what is left by its environment, see `kill_stale`)."""
        try:
            await self.call("supervisor.stopAllProcesses", True)
        except (OSError, xmlrpc.client.Error, http.client.HTTPException) as e:
            log.warning("could not stop the programs through supervisord: %s", e)

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every program (group-wide, SIGKILL after stopwaitsecs), then supervisord."""
        await self.stop_all()
        if self.process is None:
            return
        try:
            await self.call("supervisor.shutdown")
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            pass
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


KILLED_BY_A_SIGNAL = "killed by a signal"
EXITED_TOO_QUICKLY = "Exited too quickly"
"""supervisord's spawnerr for an exit within startsecs: how it exited is only in its log."""
LOG_READ_BYTES = 64 * 1024
_EXITED_LINE = re.compile(r"exited: (?P<name>\S+) \((?P<why>[^;\n]+); (?:not )?expected\)")


def exit_status(info: Mapping[str, Any] | None) -> str | None:
    """How a process ended, as far as supervisord's getProcessInfo tells (see `Supervisor.exit_cause`)."""
    state = info.get("statename") if info else None
    if not info or state not in ("EXITED", "BACKOFF", "FATAL"):
        return None
    if state != "EXITED" and info.get("spawnerr"):  # EXITED's is "Bad exit code N": no news
        return str(info["spawnerr"])  # could not be spawned, or "Exited too quickly (…)"
    status = info.get("exitstatus")
    if status == -1:
        return KILLED_BY_A_SIGNAL
    return f"exit status {status}" if isinstance(status, int) else None


def logged_exit(text: str, name: str) -> str | None:
    """What supervisord's log says of `name`'s last exit ("exited: NAME (terminated by
    SIGKILL; not expected)" → "killed by SIGKILL"); None if it says nothing of it."""
    why = None
    for m in _EXITED_LINE.finditer(text):
        if m["name"] == name:
            why = m["why"]
    return why.replace("terminated by ", "killed by ", 1) if why else None


def tail_file(path: Path, lines: int = 50, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `lines` lines of a log file (vLLM's, for error messages).

    None for `lines` <= 0, like ``tail -n 0`` (`vllama logs -f -n 0` follows only new
    lines): ``text[-0:]`` would be the whole file.
    """
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    return text[-lines:]


def claim(paths: Paths) -> int:
    """Hold the state dir for this process: the returned descriptor keeps the lock until exit.

    A second `vllama serve` on the same state dir would otherwise take the first one's
    processes for leftovers of a crash (`kill_stale`) and stop its models. The lock goes
    with the process however it dies, so a SIGKILLed router leaves nothing to clean up by hand.
    """
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SupervisorError(f"another vllama serve (pid {holder}) is using {paths.root}; "
                              "stop it, or give this one its own --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def find_stale(state_dir: Path, *, exclude: set[int] | None = None) -> list[psutil.Process]:
    """Processes left by an earlier vllama of this state dir (found by their environment)."""
    exclude = exclude or set()
    me = os.getpid()
    stale = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me or p.pid in exclude:
            continue
        try:
            if p.environ().get(STATE_ENV) == str(state_dir):
                stale.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return stale


def kill_stale(state_dir: Path, timeout: float = 15.0) -> list[int]:
    """Stop leftovers from an earlier run (TERM, then KILL): they may hold GPU memory."""
    procs = find_stale(state_dir)
    pidfile = Paths(state_dir).pidfile
    try:
        old = psutil.Process(int(pidfile.read_text().strip()))
        if "supervisord" in " ".join(old.cmdline()) and str(state_dir) in " ".join(old.cmdline()):
            procs.append(old)
    except (OSError, ValueError, psutil.Error):
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]
