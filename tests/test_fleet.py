"""The Fleet's ordering rules under races, against a stand-in supervisord and vLLM health.

The races (a reload while a model starts, a stop while requests arrive, two reloads of
one model) take seconds to set up and are luck to hit with real processes; here the
stand-ins decide when a process starts, stops and turns healthy. The same rules on real
supervisord and vLLM: tests/e2e/test_reload.py, test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.admin import model_status
from router.config import parse
from router.gpu import HostMemory
from router.lifecycle import Fleet, ModelUnavailable, Runtime, State
from router.supervisor import Paths, Program, Supervisor
from router.upstream import Upstream, UpstreamError

GIB = 1 << 30


class Supervisord:
    """supervisord as the Fleet sees it: programs, processes, and calls that can be held up."""

    def __init__(self, root: Path) -> None:
        self.paths = Paths(root)
        self.programs: dict[str, Program] = {}
        self.applied: list[dict[str, Program]] = []
        self.running: dict[str, int] = {}
        self.exited: dict[str, int] = {}
        """Program → its last process's exit status (-1: killed by a signal)."""
        self.log = ""
        """supervisord's own log, as readLog gives it."""
        self.calls: list[tuple[str, str]] = []
        self.stop_gate = asyncio.Event()
        self.stop_gate.set()
        self.apply_gate = asyncio.Event()
        self.apply_gate.set()
        # Above any pid_max (2**22): the Fleet kills each stopped "process group" it is told of.
        self._pids = itertools.count(1 << 23)

    async def apply(self, programs: Iterable[Program]) -> tuple[list[str], list[str], list[str]]:
        await self.apply_gate.wait()
        self.programs = {p.name: p for p in programs}
        self.applied.append(dict(self.programs))
        for name in [n for n in self.running if n not in self.programs]:
            del self.running[name]
        return [], [], []

    async def start(self, name: str) -> None:
        assert name in self.programs, f"start of unknown program {name}"
        self.calls.append(("start", name))
        self.exited.pop(name, None)
        self.running.setdefault(name, next(self._pids))

    def crash(self, name: str, signal: str | None = None) -> None:
        """The server exits on its own (supervisord restarts nothing: autorestart=false):
        with exit status 1, or killed by `signal`, logged as supervisord logs it."""
        del self.running[name]
        self.exited[name] = -1 if signal else 1
        why = f"terminated by {signal}" if signal else "exit status 1"
        self.log += f"2026-12-03 14:00:00,000 WARN exited: {name} ({why}; not expected)\n"

    async def call(self, method: str, *args: Any) -> Any:
        assert method == "supervisor.readLog", method
        return self.log

    exit_cause = Supervisor.exit_cause

    async def stop(self, name: str) -> None:
        self.calls.append(("stop", name))
        await self.stop_gate.wait()
        self.running.pop(name, None)

    async def kill(self, name: str) -> int | None:
        """SIGKILL of the program's process group (`Supervisor.kill`): gone at once."""
        self.calls.append(("kill", name))
        pid = self.running.pop(name, None)
        if pid is not None:
            self.exited[name] = -1
        return pid

    async def processes(self) -> dict[str, dict[str, Any]]:
        out = {n: {"statename": "EXITED", "pid": 0, "description": "Dec 03 02:00 PM", "exitstatus": status,
                   "spawnerr": f"Bad exit code {status}"} for n, status in self.exited.items()}
        return out | {n: {"statename": "RUNNING", "pid": pid} for n, pid in self.running.items()}

    def alive(self) -> bool:
        return True

    def started(self) -> list[str]:
        return [n for what, n in self.calls if what == "start"]


class Answer:
    def __init__(self, status: int, body: Any = None) -> None:
        self.status_code = status
        self._body = body

    def json(self) -> Any:
        return self._body

    @property
    def text(self) -> str:
        """vLLM's /metrics as `vllama ps` reads it: no engine queue to show here."""
        return ""


class Health:
    """vLLM's /health and /v1/models: a server answers once its port is in `ready`."""

    def __init__(self, sup: Supervisord) -> None:
        self.sup = sup
        self.ready: set[int] = set()
        self.served: dict[int, str] = {}

    def port(self, base_url: str) -> int:
        return int(base_url.rsplit(":", 1)[1])

    async def get(self, base_url: str, path: str, timeout: float | None = None) -> Answer:
        port = self.port(base_url)
        listening = any(p.argv[p.argv.index("--port") + 1] == str(port) for n, p in self.sup.programs.items()
                        if n in self.sup.running)
        if not (listening and port in self.ready):
            return Answer(503)
        if path == "/v1/models":
            return Answer(200, {"data": [{"id": self.served.get(port)}]})
        return Answer(200)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def registry(model_dir: Path, *models: dict[str, Any], engine: dict[str, Any] | None = None,
             server: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {"engine": {"device": "cpu", "base_port": 21000, **(engine or {})},
                            "server": {"cold_start_timeout": 20, "shutdown_grace": 30, **(server or {})},
                            "models": [{"source": str(model_dir), "memory_gb": 1, **m} for m in models]}
    return parse(data, path=model_dir.parent / "models.yaml")


async def fleet_of(config: Any, tmp_path: Path) -> tuple[Fleet, Supervisord, Health]:
    sup = Supervisord(tmp_path / "run")
    health = Health(sup)
    fleet = Fleet(config, sup, health, inventory=lambda: HostMemory(64 * GIB, 64 * GIB, process_rss={}))  # type: ignore[arg-type]
    await fleet.start()
    return fleet, sup, health


def make_ready(fleet: Fleet, health: Health, *names: str) -> None:
    for rt in [*fleet.runtimes.values(), *fleet.retiring]:
        if rt.name in names and rt.port is not None:
            health.ready.add(rt.port)
            health.served[rt.port] = rt.model.served_name


async def until(pred: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


async def test_an_engine_edit_leaves_the_running_servers_as_they_were_launched(tmp_path: Path, model_dir: Path) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a"}), tmp_path)
    try:
        a = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        await until(lambda: a.state == State.READY)
        launched = sup.programs[a.program]
        a.inflight = 1  # a request in flight: the old server must keep serving, unchanged

        await fleet.reload(registry(model_dir, {"name": "a"}, engine={"args": ["--enforce-eager"]}))
        await until(lambda: len(fleet.retiring) == 1)  # the new server starts beside the old one
        assert all(applied[a.program] == launched for applied in sup.applied if a.program in applied)
        new = fleet.retiring[0]
        await until(lambda: new.program in sup.programs)
        assert "--enforce-eager" in sup.programs[new.program].argv
        assert "--enforce-eager" not in sup.programs[a.program].argv
        assert ("stop", a.program) not in sup.calls
    finally:
        await fleet.close()


async def test_a_model_stopped_while_it_waited_its_turn_can_start_again(tmp_path: Path, model_dir: Path) -> None:
    cfg = registry(model_dir, {"name": "a", "load": "on_demand"}, {"name": "b", "load": "on_demand"})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    try:
        a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
        await fleet.start_model(a)
        await until(lambda: a.program in sup.running)  # a starts, holding the start lock
        await fleet.start_model(b)
        assert b.queued
        await fleet.stop_model(b, "stopped by test")
        make_ready(fleet, health, "a:latest")
        await until(lambda: a.state == State.READY)
        await until(lambda: not b.queued)

        await fleet.start_model(b)  # `vllama start b` (or a request) later on
        await until(lambda: b.program in sup.running)
        make_ready(fleet, health, "b:latest")
        await until(lambda: b.state == State.READY)
    finally:
        await fleet.close()


async def test_an_admin_stop_during_the_supervisord_update_is_not_undone(tmp_path: Path, model_dir: Path) -> None:
    fleet, sup, _ = await fleet_of(registry(model_dir, {"name": "b", "load": "on_demand"}), tmp_path)
    try:
        b = fleet.runtimes["b:latest"]
        sup.apply_gate.clear()  # supervisord is slow to take the update that carries b's budget
        await fleet.start_model(b)
        await asyncio.sleep(0.3)
        await fleet.stop_model(b, "admin", hold=True)
        sup.apply_gate.set()
        await asyncio.sleep(0.3)
        assert b.program not in sup.started()
        assert b.state == State.STOPPED and b.held
    finally:
        await fleet.close()


async def test_stopping_a_stopped_model_only_holds_it(tmp_path: Path, model_dir: Path) -> None:
    """Nothing runs, so nothing is stopped or counted as a stop; an admin's hold still applies."""
    from router.metrics import Metrics

    fleet, sup, _ = await fleet_of(registry(model_dir, {"name": "b", "load": "on_demand"}), tmp_path)
    fleet.metrics = metrics = Metrics()
    try:
        b = fleet.runtimes["b:latest"]
        assert b.state == State.STOPPED
        await fleet.stop_model(b, "stopped by admin", hold=True)
        assert b.state == State.STOPPED and b.held and b.reason == "stopped by admin"
        assert ("stop", b.program) not in sup.calls
        assert metrics.actions.labels("stop", "admin")._value.get() == 0
        with pytest.raises(ModelUnavailable, match="stopped by an admin"):
            await fleet.acquire("b")
    finally:
        await fleet.close()


async def test_a_request_during_a_stop_waits_and_the_model_comes_back(tmp_path: Path, model_dir: Path) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a", "load": "on_demand"}), tmp_path)
    try:
        a = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        (await fleet.acquire("a")).release()
        assert a.state == State.READY
        sup.stop_gate.clear()  # supervisord takes its time to stop it (stopwaitsecs)
        stopping = asyncio.create_task(fleet.stop_model(a, "idle for keep_alive"))
        await until(lambda: ("stop", a.program) in sup.calls)
        assert a.state == State.STOPPING
        request = asyncio.create_task(fleet.acquire("a"))
        await asyncio.sleep(0.3)
        assert not request.done() and a.inflight == 0  # not let through to a server being stopped
        sup.stop_gate.set()
        await stopping
        lease = await asyncio.wait_for(request, 10)  # started again and served
        assert a.state == State.READY and sup.started().count(a.program) == 2
        lease.release()
    finally:
        await fleet.close()


async def test_keep_alive_0_does_not_stop_a_model_a_new_request_holds(tmp_path: Path, model_dir: Path) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a", "load": "on_demand"}), tmp_path)
    try:
        make_ready(fleet, health, "a:latest")
        first = await fleet.acquire("a", keep_alive=0)
        first.release()  # its stop is spawned...
        second = await fleet.acquire("a")  # ...and a request arrives in the same tick
        await asyncio.sleep(0.3)
        assert ("stop", fleet.runtimes["a:latest"].program) not in sup.calls
        second.release()
    finally:
        await fleet.close()


async def test_a_second_reload_supersedes_a_rolling_restart_in_progress(tmp_path: Path, model_dir: Path) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a"}, {"name": "keep"}), tmp_path)
    try:
        make_ready(fleet, health, "a:latest", "keep:latest")
        await until(lambda: all(rt.state == State.READY for rt in fleet.runtimes.values()))
        await fleet.reload(registry(model_dir, {"name": "a", "max_model_len": 256}, {"name": "keep"}))
        await until(lambda: any(r.program in sup.running for r in fleet.retiring))  # new a is starting
        new = fleet.retiring[0]
        await fleet.reload(registry(model_dir, {"name": "keep"}))  # then a is removed
        make_ready(fleet, health, "a:latest")  # the replacement becomes ready after all
        await until(lambda: not fleet.retiring and new.state == State.STOPPED)
        assert "a:latest" not in fleet.runtimes
        assert [p for p in sup.programs if p.startswith("vllm-a")] == []
        assert [p for p in fleet.placements if p.startswith("vllm-a")] == []
    finally:
        await fleet.close()


async def test_a_changed_model_with_a_fixed_port_starts_after_its_old_server_stops(tmp_path: Path,
                                                                                 model_dir: Path) -> None:
    cfg = registry(model_dir, {"name": "a", "port": 21900, "load": "on_demand"})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    try:
        old = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        lease = await fleet.acquire("a")
        await fleet.reload(registry(model_dir, {"name": "a", "port": 21900, "max_model_len": 256, "load": "on_demand"}))
        await until(lambda: fleet.runtimes["a:latest"] is not old)
        new = fleet.runtimes["a:latest"]
        assert new.port == old.port and new.program != old.program  # a program (and log) of its own
        request = asyncio.create_task(fleet.acquire("a"))
        await asyncio.sleep(0.5)
        assert new.program not in sup.started()  # the port is the old server's until it has drained
        assert not request.done()
        lease.release()
        await until(lambda: ("stop", old.program) in sup.calls)
        await until(lambda: new.program in sup.running)
        assert sup.calls.index(("stop", old.program)) < sup.calls.index(("start", new.program))
        (await asyncio.wait_for(request, 10)).release()
        assert new.state == State.READY
    finally:
        await fleet.close()


async def test_a_start_that_outlasts_the_timeout_is_stopped_before_the_next_model_starts(
        tmp_path: Path, model_dir: Path) -> None:
    cfg = registry(model_dir, {"name": "a", "load": "on_demand"}, {"name": "b", "load": "on_demand"},
                   server={"cold_start_timeout": 1})
    fleet, sup, _ = await fleet_of(cfg, tmp_path)
    try:
        a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
        await fleet.start_model(a)  # a never answers /health
        await until(lambda: a.program in sup.running)
        await fleet.start_model(b)
        await until(lambda: b.program in sup.running, timeout=5)
        assert a.program not in sup.running  # a was stopped first: never two starting at once
        assert a.state == State.FAILED and "cold_start_timeout" in a.reason
        assert sup.calls.index(("stop", a.program)) < sup.calls.index(("start", b.program))
    finally:
        await fleet.close()


async def test_a_crashed_model_is_restarted_in_its_turn(tmp_path: Path, model_dir: Path) -> None:
    cfg = registry(model_dir, {"name": "a"}, {"name": "b", "load": "on_demand"})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    try:
        a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
        make_ready(fleet, health, "a:latest")
        await until(lambda: a.state == State.READY)
        await fleet.start_model(b)
        await until(lambda: b.program in sup.running)  # b starts (profiles its device) ...
        sup.crash(a.program)  # ... when a dies
        await until(lambda: a.state == State.RESTARTING)
        await asyncio.sleep(0.5)
        assert sup.started().count(a.program) == 1  # not restarted while b starts
        make_ready(fleet, health, "b:latest")
        await until(lambda: b.state == State.READY)
        await until(lambda: a.state == State.READY)  # then a, in its turn
        assert sup.started() == [a.program, b.program, a.program]
        assert a.restarts == 1 and a.failed_starts == 0
    finally:
        await fleet.close()


async def test_a_model_that_keeps_exiting_as_it_starts_fails_after_startretries(tmp_path: Path,
                                                                              model_dir: Path) -> None:
    cfg = registry(model_dir, {"name": "a", "load": "on_demand"}, engine={"startretries": 1})
    fleet, sup, _ = await fleet_of(cfg, tmp_path)
    try:
        a = fleet.runtimes["a:latest"]
        await fleet.start_model(a)
        for _ in range(2):  # the first try and one retry, each dying before it is ready
            await until(lambda: a.program in sup.running)
            sup.crash(a.program)
        await until(lambda: a.state == State.FAILED, timeout=15)
        assert "exited 2 times before it was ready; gave up" in a.reason
        assert sup.started().count(a.program) == 2
    finally:
        await fleet.close()


async def test_no_model_is_stopped_while_another_starts(tmp_path: Path, model_dir: Path) -> None:
    cfg = registry(model_dir, {"name": "a", "load": "on_demand", "keep_alive": 0},
                   {"name": "b", "load": "on_demand"})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    try:
        a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
        make_ready(fleet, health, "a:latest")
        lease = await fleet.acquire("a")
        await fleet.start_model(b)
        await until(lambda: b.program in sup.running)  # b profiles its device ...
        lease.release()  # ... when a's last request ends (keep_alive 0) ...
        admin = asyncio.create_task(fleet.stop_model(a, "admin", hold=True))  # ... and an admin stops it too
        await asyncio.sleep(0.5)
        # Its process waits its turn; its clients do not: no new request reaches it meanwhile.
        assert ("stop", a.program) not in sup.calls and a.state == State.STOPPING
        with pytest.raises(ModelUnavailable, match="stopped by an admin"):
            await fleet.acquire("a")
        make_ready(fleet, health, "b:latest")
        await until(lambda: ("stop", a.program) in sup.calls)
        await admin
        assert b.state == State.READY and a.state == State.STOPPED
    finally:
        await fleet.close()


def test_free_port_stops_at_the_last_port() -> None:
    """Past 65535 a clear error, not bind()'s OverflowError."""
    from router.lifecycle import free_port

    with pytest.raises(OSError, match="no free port for a vLLM server from 65535 to 65535"):
        free_port(65535, {65535})


async def test_a_reload_plans_on_the_inventory_of_its_own_engine_device(tmp_path: Path, model_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from router import lifecycle

    asked: list[str] = []

    def detect(device: str, **_: Any) -> HostMemory:
        asked.append(device)
        return HostMemory(64 * GIB, 64 * GIB, process_rss={})

    monkeypatch.setattr(lifecycle.gpu, "detect", detect)
    sup = Supervisord(tmp_path / "run")
    fleet = Fleet(registry(model_dir, {"name": "a"}), sup, Health(sup))  # type: ignore[arg-type]
    await fleet.start()
    try:
        assert asked == ["cpu"]
        await fleet.reload(registry(model_dir, {"name": "a"}, engine={"device": "auto"}))
        assert asked[1:] == ["auto"]  # not the device read at boot
    finally:
        await fleet.close()


async def test_each_engine_device_setting_is_resolved_once(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router import lifecycle

    asked: list[str] = []

    def detect(device: str, **_: Any) -> HostMemory:
        asked.append(device)
        return HostMemory(64 * GIB, 64 * GIB, reason=f"CPU mode: asked for {device}", process_rss={})

    monkeypatch.setattr(lifecycle.gpu, "detect", detect)
    sup = Supervisord(tmp_path / "run")
    fleet = Fleet(registry(model_dir, {"name": "a"}, engine={"device": "auto"}), sup, Health(sup))  # type: ignore[arg-type]
    await fleet.start()
    try:
        with fleet.inventory() as inv:
            assert isinstance(inv, HostMemory) and inv.reason == "CPU mode: asked for auto"
        assert asked == ["auto"]  # boot resolved it; later reads keep that
        await fleet.reload(registry(model_dir, {"name": "a"}, {"name": "b", "load": "on_demand"},
                                    engine={"device": "auto"}))
        assert asked == ["auto"]  # same engine.device: same mode
        with pytest.raises(lifecycle.ReloadRejected):  # a cpu registry that does not fit: nothing changes
            await fleet.reload(registry(model_dir, {"name": "a", "memory_gb": 999}, engine={"device": "cpu"}))
        assert asked == ["auto", "cpu"]
        with fleet.inventory() as inv:
            assert isinstance(inv, HostMemory) and inv.reason == "CPU mode: asked for auto"
        await fleet.reload(registry(model_dir, {"name": "a"}, engine={"device": "cpu"}))
        with fleet.inventory() as inv:  # the new setting is in force, as it was resolved
            assert isinstance(inv, HostMemory) and inv.reason == "CPU mode: asked for cpu"
        await fleet.reload(registry(model_dir, {"name": "a"}, engine={"device": "auto"}))
        with fleet.inventory() as inv:
            assert isinstance(inv, HostMemory) and inv.reason == "CPU mode: asked for auto"
        assert asked == ["auto", "cpu"]  # each setting resolved once, by its first read
    finally:
        await fleet.close()


async def test_an_nvml_failure_after_boot_refuses_gpu_models_instead_of_cpu_mode(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`device: auto` on a GPU box whose driver is upgraded under the server (NVML: version mismatch)."""
    import sys

    import pynvml

    from router.lifecycle import ReloadRejected

    try:
        from .test_gpu import fake_nvml
    except ImportError:
        from test_gpu import fake_nvml  # type: ignore[no-redef]

    nvml = fake_nvml([80])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    a_, b_ = {"name": "a", "vram_gb": 8}, {"name": "b", "vram_gb": 8, "load": "on_demand"}
    sup = Supervisord(tmp_path / "run")
    health = Health(sup)
    fleet = Fleet(registry(model_dir, a_, b_, engine={"device": "auto"}), sup, health)  # type: ignore[arg-type]
    await fleet.start()
    try:
        a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
        assert fleet.placements[a.program].gpus == [0]
        make_ready(fleet, health, "a:latest")
        await until(lambda: a.state == State.READY)

        nvml.init_error = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
        await fleet.start_model(b)
        await until(lambda: b.state == State.FAILED or b.program in sup.started())
        assert b.program not in sup.started() and b.program not in fleet.placements
        assert b.state == State.FAILED and "no GPU is visible" in b.reason and "NVML/RM version mismatch" in b.reason
        with pytest.raises(ReloadRejected, match="c:latest: no GPU is visible.*version mismatch"):
            await fleet.reload(registry(model_dir, a_, b_, {"name": "c", "vram_gb": 8}, engine={"device": "auto"}))

        nvml.init_error = None  # rebooted into the new driver (or it recovered): the GPU is back
        await fleet.start_model(b)
        await until(lambda: b.program in sup.started())
        assert fleet.placements[b.program].gpus == [0]
    finally:
        await fleet.close()


async def test_closing_the_fleet_cancels_an_auto_pull(tmp_path: Path, model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A download runs in a thread: without being told, it would hold up the exit until it ended."""
    import threading

    from router import lifecycle

    told = threading.Event()

    def pull(repo: str, revision: str | None = None, *, on_progress: Any = None,
             cancel: threading.Event | None = None) -> Path:
        assert cancel is not None
        cancel.wait(30)
        told.set()
        raise lifecycle.hub.PullError(499, "cancelled")

    monkeypatch.setattr(lifecycle.hub, "local_snapshot", lambda *_: None)
    monkeypatch.setattr(lifecycle.hub, "pull", pull)
    fleet, _, _ = await fleet_of(registry(model_dir, {"name": "a", "source": "org/a"}), tmp_path)
    a = fleet.runtimes["a:latest"]
    await until(lambda: "downloading org/a" in a.reason)
    await fleet.close()
    assert await asyncio.to_thread(told.wait, 5)


async def test_a_missing_always_model_starts_once_its_files_are_there(tmp_path: Path, model_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`vllama pull` runs in a process of its own: the fleet notices the files, no request needed."""
    from datetime import UTC, datetime

    from router import lifecycle

    pulled: list[bool] = []

    def local_snapshot(source: str, revision: str | None = None) -> Any:
        if not pulled:
            return None
        return lifecycle.hub.LocalModel(model_dir, 1, datetime.now(UTC), "0" * 40, complete=True)

    monkeypatch.setattr(lifecycle.hub, "local_snapshot", local_snapshot)
    cfg = registry(model_dir, {"name": "a", "source": "org/a", "auto_pull": False})
    fleet, sup, _ = await fleet_of(cfg, tmp_path)
    try:
        a = fleet.runtimes["a:latest"]
        await until(lambda: a.state == State.MISSING)
        fleet.missing_check_interval = 0.05
        await asyncio.sleep(0.3)
        assert a.state == State.MISSING and not sup.started()  # no files, no start
        pulled.append(True)
        await until(lambda: a.program in sup.started())
    finally:
        await fleet.close()


# --- keep_alive: each request sets it anew -------------------------------------------------------


async def test_a_request_without_keep_alive_uses_the_models_own_after_one_with_0(tmp_path: Path,
                                                                                model_dir: Path) -> None:
    """As in Ollama: one `keep_alive: 0` unloads the model after *that* request; later requests
    without keep_alive keep it loaded for the model's configured keep_alive."""
    cfg = registry(model_dir, {"name": "a", "load": "on_demand", "keep_alive": "10m"})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    try:
        a = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        (await fleet.acquire("a", keep_alive=0)).release()
        await until(lambda: a.state == State.STOPPED)  # unloaded after that request

        lease = await fleet.acquire("a")  # started again
        lease.release()
        await asyncio.sleep(0.5)
        assert a.state == State.READY and sup.calls.count(("stop", a.program)) == 1
        assert a.keep_alive == 600
        assert a.expires_at is not None and a.expires_at - time.time() > 590

        (await fleet.acquire("a", keep_alive=3600)).release()
        assert a.keep_alive == 3600  # the latest request's own, while given
        (await fleet.acquire("a")).release()
        assert a.keep_alive == 600
    finally:
        await fleet.close()


# --- why a server exited --------------------------------------------------------------------------

ACCESS = 'INFO:     127.0.0.1:36284 - "POST /v1/chat/completions HTTP/1.1" 200 OK'


def write_log(sup: Supervisord, program: str, *lines: str) -> None:
    path = sup.paths.log(program)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


async def test_a_crash_is_told_by_its_exit_status_or_signal_not_the_last_log_line(tmp_path: Path,
                                                                                 model_dir: Path) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a"}), tmp_path)
    try:
        a = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        await until(lambda: a.state == State.READY)
        pid = a.pid
        write_log(sup, a.program, "INFO: Started server process", ACCESS, ACCESS)
        sup.crash(a.program, "SIGKILL")  # the OOM killer, say: the log just stops
        await until(lambda: a.state == State.RESTARTING)
        assert a.reason == f"process {pid} exited (killed by SIGKILL)"

        await until(lambda: a.state == State.READY)  # restarted
        pid = a.pid
        write_log(sup, a.program, "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                  "RuntimeError: CUDA error: an illegal memory access was encountered", ACCESS)
        sup.crash(a.program)
        await until(lambda: a.state == State.RESTARTING)
        assert a.reason == (f"process {pid} exited (exit status 1): "
                            "RuntimeError: CUDA error: an illegal memory access was encountered")
    finally:
        await fleet.close()


# --- what is left of a process group ----------------------------------------------------------------


def process_group() -> subprocess.Popen[bytes]:
    """A process leading a group of its own, as supervisord starts a vLLM server."""
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


async def test_a_deliberate_stop_kills_what_is_left_of_its_group_without_a_warning(
        tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After supervisord stopped a server, its EngineCore may still be on its way out:
    killing it is routine, not a warning in every keep_alive unload."""
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a", "load": "on_demand"}), tmp_path)
    proc = process_group()
    try:
        a = fleet.runtimes["a:latest"]
        sup._pids = iter([proc.pid])  # type: ignore[assignment]
        make_ready(fleet, health, "a:latest")
        (await fleet.acquire("a")).release()
        assert a.pid == proc.pid
        caplog.set_level(logging.DEBUG, logger="vllama.lifecycle")
        await fleet.stop_model(a, "keep_alive 0")
        assert proc.wait(5) == -signal.SIGKILL
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        proc.kill()
        await fleet.close()


async def test_leftovers_of_a_server_that_died_on_its_own_are_killed_with_a_warning(
        tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a", "load": "on_demand"}), tmp_path)
    proc = process_group()
    try:
        a = fleet.runtimes["a:latest"]
        sup._pids = iter([proc.pid, *range(1 << 23, (1 << 23) + 10)])  # type: ignore[assignment]
        make_ready(fleet, health, "a:latest")
        (await fleet.acquire("a")).release()
        sup.crash(a.program)  # the leader died; its children (here: the leader) live on
        await until(lambda: a.state != State.READY)
        assert proc.wait(5) == -signal.SIGKILL
        assert f"killed leftover processes of group {proc.pid}" in caplog.text
    finally:
        proc.kill()
        await fleet.close()


# --- a stop with requests in flight -----------------------------------------------------------------


class StallingServer:
    """vLLM once SIGTERM aborted its engine: a stream that sent its first chunk and then
    nothing, and an HTTP server that exits only once that connection is closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.streaming = asyncio.Event()
        """Set once it has sent a stream's first chunk."""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        data = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()
        self.streaming.set()
        while await reader.read(65536):
            pass
        self.closed.set()
        writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_a_stop_ends_the_streams_in_flight_at_once(tmp_path: Path, model_dir: Path) -> None:
    """`vllama stop` of a model that streams: the stop does not wait for stopwaitsecs, and
    the stream ends with an error at once instead of stalling until SIGKILL."""
    server = StallingServer()
    await server.start()
    fleet, sup, health = await fleet_of(
        registry(model_dir, {"name": "a", "load": "on_demand", "port": server.port}), tmp_path)
    upstream = Upstream()

    async def stop(name: str) -> None:  # supervisord: TERM, then wait for the server to exit
        sup.calls.append(("stop", name))
        await asyncio.wait_for(server.closed.wait(), 20)  # stopwaitsecs, then SIGKILL
        sup.running.pop(name, None)

    try:
        a = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        lease = await fleet.acquire("a")
        events = upstream.events(a.base_url, "/v1/chat/completions", {"stream": True})
        assert (await anext(events))[0]["choices"][0]["delta"]["content"] == "Hi"
        reading = asyncio.create_task(anext(events))
        sup.stop = stop  # type: ignore[method-assign]
        began = time.monotonic()
        await asyncio.wait_for(fleet.stop_model(a, "stopped by admin", hold=True), 5)
        assert time.monotonic() - began < 2 and a.state == State.STOPPED
        with pytest.raises(UpstreamError) as e:
            await asyncio.wait_for(reading, 2)
        assert e.value.status == 502
        lease.release()
    finally:
        await upstream.aclose()
        await fleet.close()
        server.close()


def terminating_stop(sup: Supervisord, server: StallingServer) -> Any:
    """supervisord's stop of a server that exits once its last connection is closed
    (stopwaitsecs, then SIGKILL, if never)."""
    async def stop(name: str) -> None:
        sup.calls.append(("stop", name))
        await asyncio.wait_for(server.closed.wait(), 20)
        sup.running.pop(name, None)

    return stop


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_an_admin_stop_tells_the_streams_it_cuts_that_the_model_was_stopped(
        tmp_path: Path, model_dir: Path, path: str) -> None:
    """The stream a `vllama stop` cuts ends with why, in the shape of its API (an NDJSON error
    line, or OpenAI's error event), not with "the model server closed the connection"."""
    from router.app import create_app
    from router.catalog import Catalog
    from router.service import OllamaService

    server = StallingServer()
    await server.start()
    cfg = registry(model_dir, {"name": "a", "load": "on_demand", "port": server.port})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    upstream = Upstream()
    app = create_app(OllamaService(fleet, upstream), Catalog(cfg))
    try:
        a = fleet.runtimes["a:latest"]
        make_ready(fleet, health, "a:latest")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            answer = asyncio.create_task(client.post(path, json=body))
            await asyncio.wait_for(server.streaming.wait(), 10)
            sup.stop = terminating_stop(sup, server)  # type: ignore[method-assign]
            await asyncio.wait_for(fleet.stop_model(a, "stopped by admin", hold=True), 5)
            r = await asyncio.wait_for(answer, 5)
        said = 'model "a:latest" was stopped (vllama stop) while answering'
        if path == "/api/chat":
            assert json.loads(r.text.splitlines()[-1]) == {"error": said}
        else:
            last = json.loads(r.text.strip().split("\n\n")[-1].removeprefix("data: "))
            assert last["error"]["message"] == said and last["error"]["code"] == 502
    finally:
        await upstream.aclose()
        await fleet.close()
        server.close()


async def stream_in_flight(fleet: Fleet, health: Health, upstream: Upstream) -> tuple[Any, asyncio.Task[Any]]:
    """A request to model a that has its first chunk and waits for the next: its lease and the read."""
    a = fleet.runtimes["a:latest"]
    make_ready(fleet, health, "a:latest")
    lease = await fleet.acquire("a")
    events = upstream.events(a.base_url, "/v1/chat/completions", {"stream": True})
    assert (await anext(events))[0]["choices"][0]["delta"]["content"] == "Hi"
    return lease, asyncio.create_task(anext(events))


async def test_giving_up_on_a_crash_loop_ends_the_streams_still_in_flight(tmp_path: Path, model_dir: Path) -> None:
    server = StallingServer()
    await server.start()
    cfg = registry(model_dir, {"name": "a", "load": "on_demand", "port": server.port}, engine={"startretries": 0})
    fleet, sup, health = await fleet_of(cfg, tmp_path)
    upstream = Upstream()
    try:
        a = fleet.runtimes["a:latest"]
        lease, reading = await stream_in_flight(fleet, health, upstream)
        sup.stop = terminating_stop(sup, server)  # type: ignore[method-assign]
        health.ready.discard(server.port)  # restarted, it never gets ready ...
        sup.crash(a.program)
        await until(lambda: a.state == State.STARTING and a.program in sup.running)
        sup.crash(a.program)  # ... and exits again: given up at once (startretries 0)
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(reading, 5)
        assert a.state == State.FAILED
        assert lease.explain("closed") == ('model "a:latest" was stopped (it exited 1 times before it was ready; '
                                       'gave up) while answering')
        lease.release()
    finally:
        await upstream.aclose()
        await fleet.close()
        server.close()


async def test_moving_a_model_off_a_taken_port_ends_the_streams_to_the_old_one(tmp_path: Path,
                                                                              model_dir: Path) -> None:
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a", "load": "on_demand"}), tmp_path)
    server = StallingServer()
    upstream = Upstream()
    try:
        a = fleet.runtimes["a:latest"]
        old_port = a.port
        await server.start(port=old_port or 0)
        lease, reading = await stream_in_flight(fleet, health, upstream)
        sup.stop = terminating_stop(sup, server)  # type: ignore[method-assign]
        write_log(sup, a.program, "OSError: [Errno 98] Address already in use")
        sup.crash(a.program)
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(reading, 5)
        await until(lambda: a.port != old_port)
        assert lease.explain("closed").startswith('model "a:latest" was stopped (its port was taken')
        lease.release()
    finally:
        await upstream.aclose()
        await fleet.close()
        server.close()


async def test_an_admin_stop_ends_the_streams_at_once_while_another_model_starts(tmp_path: Path,
                                                                               model_dir: Path) -> None:
    """The process stop waits its turn behind another model's start (GPU memory profiling), which
    may take a minute; the stop's clients do not: their streams end now, with the stop's note."""
    server = StallingServer()
    await server.start()
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "a", "load": "on_demand", "port": server.port},
                                                 {"name": "b", "load": "on_demand"}), tmp_path)
    upstream = Upstream()
    try:
        a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
        lease, reading = await stream_in_flight(fleet, health, upstream)
        sup.stop = terminating_stop(sup, server)  # type: ignore[method-assign]
        sup.apply_gate.clear()  # b's start holds the start lock, in supervisord's update
        starting = asyncio.create_task(fleet.start_model(b))
        await until(lambda: b.state == State.STARTING)
        stopping = asyncio.create_task(fleet.stop_model(a, "stopped by admin", hold=True))
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(reading, 5)
        assert lease.explain("closed") == 'model "a:latest" was stopped (vllama stop) while answering'
        assert a.state == State.STOPPING and not stopping.done()  # the process stop still waits its turn
        lease.release()
        make_ready(fleet, health, "b:latest")
        sup.apply_gate.set()
        await asyncio.wait_for(starting, 10)
        await asyncio.wait_for(stopping, 10)
        assert a.state == State.STOPPED and a.held and b.state == State.READY
    finally:
        await upstream.aclose()
        await fleet.close()
        server.close()


async def test_a_reload_that_removes_a_model_tells_the_streams_that_outlive_the_drain(tmp_path: Path,
                                                                                     model_dir: Path) -> None:
    server = StallingServer()
    await server.start()
    fleet, sup, health = await fleet_of(
        registry(model_dir, {"name": "a", "load": "on_demand", "port": server.port}), tmp_path)
    upstream = Upstream()
    try:
        lease, reading = await stream_in_flight(fleet, health, upstream)
        sup.stop = terminating_stop(sup, server)  # type: ignore[method-assign]
        await fleet.reload(registry(model_dir, server={"shutdown_grace": 0}))
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(reading, 5)
        assert lease.explain("closed") == 'model "a:latest" was stopped (removed from the registry) while answering'
        lease.release()
    finally:
        await upstream.aclose()
        await fleet.close()
        server.close()


# --- a saved change that does not start --------------------------------------------------

BOGUS = "api_server.py: error: unrecognized arguments: --bogus-flag"


def tiny(model_dir: Path, *args: str) -> Any:
    return registry(model_dir, {"name": "a", "vllm_args": list(args)}, engine={"startretries": 0})


async def change_that_fails(tmp_path: Path, model_dir: Path) -> tuple[Fleet, Supervisord, Health, Runtime]:
    """a serves `--max-num-seqs 8`; the file is saved with `--bogus-flag`, whose server exits
    as it starts (argparse), so the rolling replacement gives up and the old server serves on."""
    fleet, sup, health = await fleet_of(tiny(model_dir, "--max-num-seqs", "8"), tmp_path)
    a = fleet.runtimes["a:latest"]
    make_ready(fleet, health, "a:latest")
    await until(lambda: a.state == State.READY)
    await fleet.reload(tiny(model_dir, "--bogus-flag"))
    await crash_replacement(sup)
    return fleet, sup, health, a


async def crash_replacement(sup: Supervisord) -> None:
    """The replacement's vLLM refuses its command line as it starts; returns once the fleet has
    given it up (its program dropped)."""
    await until(lambda: any("--bogus-flag" in sup.programs[n].argv for n in sup.running if n in sup.programs))
    name = next(n for n in sup.running if "--bogus-flag" in sup.programs[n].argv)
    write_log(sup, name, "usage: api_server.py [-h] [--headless]", "                     [model_tag]", BOGUS)
    sup.crash(name)
    await until(lambda: name not in sup.programs)


async def test_a_change_that_did_not_start_is_shown_while_the_old_server_serves(tmp_path: Path,
                                                                              model_dir: Path) -> None:
    """QA: after a failed rolling replacement, ps said `ready`, /vllama/config nothing, and only
    the log told that the file and the running server disagreed."""
    fleet, sup, _health, a = await change_that_fails(tmp_path, model_dir)
    try:
        assert fleet.runtimes["a:latest"] is a and a.state == State.READY
        assert "--max-num-seqs" in sup.programs[a.program].argv
        assert BOGUS in a.pending_error  # type: ignore[operator]
        assert fleet.failed_changes() == {"a:latest": a.pending_error}
        status = await model_status(fleet, a)
        assert status.state == "ready" and status.change == "failed" and status.change_error == a.pending_error
        assert "saved configuration did not start" in status.reason and BOGUS in status.reason
        assert "vllama restart a:latest" in status.reason
    finally:
        await fleet.close()


async def test_a_reload_of_the_same_file_tries_a_change_that_did_not_start_again(tmp_path: Path,
                                                                               model_dir: Path) -> None:
    """QA: a second `vllama reload` said "nothing changed": the fleet had recorded the failed
    change as applied, and the next `vllama serve` failed the model."""
    fleet, sup, health, a = await change_that_fails(tmp_path, model_dir)
    try:
        d = await fleet.reload(tiny(model_dir, "--bogus-flag"))
        assert d["changed"] == ["a:latest"]
        assert a.pending_error is None and (await model_status(fleet, a)).change == "starting"
        await until(lambda: len(fleet.retiring) == 1)
        new = fleet.retiring[0]
        await until(lambda: new.program in sup.running)
        make_ready(fleet, health, "a:latest")  # this time it starts (the flag came with an upgrade, say)
        await until(lambda: fleet.runtimes["a:latest"] is new)
        assert "--bogus-flag" in sup.programs[new.program].argv and fleet.failed_changes() == {}
    finally:
        await fleet.close()


async def test_a_file_put_back_to_what_serves_ends_the_failed_change(tmp_path: Path, model_dir: Path) -> None:
    fleet, sup, _health, a = await change_that_fails(tmp_path, model_dir)
    try:
        started = len(sup.started())
        d = await fleet.reload(tiny(model_dir, "--max-num-seqs", "8"))
        assert d["changed"] == [] and d["unchanged"] == ["a:latest"]
        assert a.pending is None and fleet.failed_changes() == {}
        assert (await model_status(fleet, a)).change is None
        await asyncio.sleep(0.3)
        assert len(sup.started()) == started and fleet.retiring == []  # nothing to start: it serves that
    finally:
        await fleet.close()


async def test_restart_of_a_model_whose_change_did_not_start_tries_the_change(tmp_path: Path,
                                                                            model_dir: Path) -> None:
    """QA: `vllama restart` restarted the old arguments, while models.yaml said otherwise. It now
    tries the saved configuration, rolling: the old server serves on if it fails again."""
    fleet, sup, _health, a = await change_that_fails(tmp_path, model_dir)
    try:
        await fleet.restart_model(a)
        assert ("stop", a.program) not in sup.calls  # the old server serves on meanwhile
        assert a.change_note is not None and "starting beside" in a.change_note
        await crash_replacement(sup)  # fails again ...
        assert a.pending_error is not None
        assert ("stop", a.program) not in sup.calls and a.state == State.READY  # ... and a served throughout
        bogus = {n for applied in sup.applied for n, p in applied.items() if "--bogus-flag" in p.argv}
        assert len([n for n in sup.started() if n in bogus]) == 2  # the reload's try and the restart's
    finally:
        await fleet.close()


# --- shutdown ----------------------------------------------------------------------------


async def test_close_kills_the_servers_that_never_became_ready(tmp_path: Path, model_dir: Path) -> None:
    """QA: Ctrl-C during a cold start took 20 s and more: vLLM ignores SIGTERM while it
    initialises, so supervisord waited engine.stopwaitsecs before its SIGKILL."""
    fleet, sup, health = await fleet_of(registry(model_dir, {"name": "b"}, {"name": "a"}), tmp_path)
    a, b = fleet.runtimes["a:latest"], fleet.runtimes["b:latest"]
    make_ready(fleet, health, "b:latest")
    await until(lambda: b.state == State.READY and a.program in sup.running)  # a initialises
    await fleet.close()
    assert ("kill", a.program) in sup.calls and a.program not in sup.running
    assert ("kill", b.program) not in sup.calls  # a ready server gets supervisord's SIGTERM


async def test_a_request_waiting_for_a_start_gets_503_at_once_on_shutdown(tmp_path: Path, model_dir: Path) -> None:
    """QA: a request waiting for a cold start held `vllama serve`'s exit until the model was
    ready and had answered it (34 s); requests on a ready model still finish."""
    cfg = registry(model_dir, {"name": "a", "load": "on_demand"}, {"name": "b"})
    fleet, _sup, health = await fleet_of(cfg, tmp_path)
    b = fleet.runtimes["b:latest"]
    make_ready(fleet, health, "b:latest")
    await until(lambda: b.state == State.READY)
    serving = await fleet.acquire("b")
    request = asyncio.create_task(fleet.acquire("a"))
    await until(lambda: fleet.runtimes["a:latest"].waiting == 1)
    closing = asyncio.create_task(fleet.close())
    with pytest.raises(ModelUnavailable, match="vllama is shutting down"):
        async with asyncio.timeout(3):
            await request
    with pytest.raises(ModelUnavailable, match="vllama is shutting down"):
        await fleet.acquire("a")  # not started for a request that comes now
    await closing
    assert b.state == State.READY and b.inflight == 1  # the request in flight was left alone
    serving.release()
