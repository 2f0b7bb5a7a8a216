"""No orphans: graceful SIGTERM, a SIGKILLed router, and a supervisord that dies under the router."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .harness import Server, free_port, held_stream, state_processes, write_config

pytestmark = pytest.mark.e2e


def one_model_server(root: Path, tiny_model: Path, state_dir: Path | None = None) -> Server:
    cfg = write_config(root / f"models-{time.monotonic_ns()}.yaml",
                       [{"name": "solo", "source": str(tiny_model), "max_model_len": 4096}],
                       server={"shutdown_grace": 60})
    srv = Server(config_path=cfg, state_dir=state_dir or root / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(["solo"])
    except BaseException:
        srv.stop()
        raise
    return srv


def vllm_pids(srv: Server) -> set[int]:
    return {p.pid for p in state_processes(srv.state_dir) if "supervisord" not in " ".join(p.cmdline())}


def test_sigterm_lets_in_flight_requests_finish_then_leaves_nothing(tmp_path: Path, tiny_model: Path) -> None:
    srv = one_model_server(tmp_path, tiny_model)
    try:
        _sigterm_with_a_request_in_flight(srv)
    finally:
        srv.stop()
    assert state_processes(srv.state_dir) == []


def _sigterm_with_a_request_in_flight(srv: Server) -> None:
    tree = {p.pid for p in srv.tree()}
    assert len(tree) >= 4  # vllama, supervisord, vLLM API server, EngineCore (+ worker)
    body = {"model": "solo", "messages": [{"role": "user", "content": "go"}],
            "options": {"num_predict": 3000, "temperature": 0}}
    with held_stream(srv.url, "solo", "/api/chat", body) as t:  # in flight when the SIGTERM comes
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Shutting down" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # time enough to stop the model, were it not waiting for the request
        assert srv.proc.poll() is None and t.is_alive(), t
        assert "stopping models and supervisord" not in srv.log()  # it waits for the request first
    t.join(120)
    lines = t.lines
    assert lines[-1]["done"] is True, lines[-1]  # finished normally, not cut
    assert lines[-1]["eval_count"] == 3000, t  # (temperature 0: this model never says EOS here)
    assert srv.proc.wait(120) == 0
    time.sleep(1)
    assert [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    assert state_processes(srv.state_dir) == []


def test_a_new_serve_stops_what_a_killed_one_left_behind(tmp_path: Path, tiny_model: Path) -> None:
    first = one_model_server(tmp_path, tiny_model)
    try:
        _kill_router_and_restart(tmp_path, tiny_model, first)
    finally:
        first.stop()
        for p in state_processes(first.state_dir):
            p.kill()


def _kill_router_and_restart(tmp_path: Path, tiny_model: Path, first: Server) -> None:
    old = vllm_pids(first)
    assert old
    # The worst case: router and supervisord both die at once (OOM killer, kill -9 of both).
    # Neither may see the other go first: a SIGKILLed router hands supervisord a SIGTERM
    # (PDEATHSIG), which stops the models in order; a router that saw supervisord die first
    # stops them itself. So the router is frozen while supervisord dies, then killed.
    sup = [p for p in state_processes(first.state_dir) if "supervisord" in " ".join(p.cmdline())]
    assert len(sup) == 1
    psutil.Process(first.proc.pid).suspend()
    sup[0].kill()
    first.proc.kill()
    first.proc.wait()
    time.sleep(1)
    assert old & {p.pid for p in state_processes(first.state_dir)}, "the vLLM processes should outlive them"

    second = one_model_server(tmp_path, tiny_model, state_dir=first.state_dir)
    try:
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in old)
        servers = [p for p in state_processes(second.state_dir) if "vllm.entrypoints" in " ".join(p.cmdline())]
        assert len(servers) == 1  # only the new one
        r = httpx.post(second.url + "/api/generate", json={"model": "solo", "prompt": "hi", "stream": False,
                                                           "options": {"num_predict": 3}}, timeout=60)
        assert r.status_code == 200
    finally:
        second.stop()
    assert state_processes(second.state_dir) == []


def test_router_shuts_down_when_supervisord_dies(tmp_path: Path, tiny_model: Path) -> None:
    srv = one_model_server(tmp_path, tiny_model)
    try:
        _kill_supervisord(srv)
    finally:
        srv.stop()


def _kill_supervisord(srv: Server) -> None:
    sup = [p for p in state_processes(srv.state_dir) if "supervisord" in " ".join(p.cmdline())]
    assert len(sup) == 1
    sup[0].kill()
    assert srv.proc.wait(90) == 1  # a failure (for Restart=on-failure), not a crash and not a headless router
    time.sleep(1)
    assert state_processes(srv.state_dir) == []  # and it took the orphaned vLLM with it
    assert "supervisord is gone" in srv.log()
