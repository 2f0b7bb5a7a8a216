"""A stop with a request in flight, and a crash's reason, with real supervisord and vLLM.

vLLM aborts its engine on SIGTERM, but its HTTP server then waits for every open connection:
without the router cutting its own, `vllama stop` took engine.stopwaitsecs (20 s, until
SIGKILL) and the client's stream stalled as long.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness import Server, free_port, held_stream, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("stop-in-flight")
    cfg = write_config(root / "models.yaml", [{"name": "solo", "source": str(tiny_model), "max_model_len": 4096}])
    srv = Server(config_path=cfg, state_dir=root / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(["solo"])
        yield srv
    finally:
        srv.stop()


def full_log(srv: Server) -> str:
    assert srv.log_path is not None
    return srv.log_path.read_text()


def test_an_admin_stop_ends_the_stream_in_flight_at_once(solo: Server) -> None:
    body = {"model": "solo", "messages": [{"role": "user", "content": "go"}],
            "options": {"num_predict": 3000, "temperature": 0}}
    answers: list[httpx.Response] = []
    stop = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{solo.url}/vllama/models/solo/stop", timeout=60)))
    with held_stream(solo.url, "solo", "/api/chat", body) as t:
        stop.start()
        time.sleep(1)  # the stop is under way while the request is in flight
    resumed = time.monotonic()
    stop.join(60)
    t.join(60)
    took = time.monotonic() - resumed
    assert answers and answers[0].status_code == 200 and answers[0].json()["state"] == "stopped", answers
    assert took < 10, f"stop took {took:.1f}s after the server could act (stopwaitsecs is 20)"
    assert not t.is_alive() and t.lines and "error" in t.lines[-1], t
    assert "killed leftover processes" not in full_log(solo)


def test_a_killed_server_is_said_killed_by_sigkill(solo: Server) -> None:
    assert httpx.post(f"{solo.url}/vllama/models/solo/start", timeout=60).status_code == 202
    solo.wait_ready(["solo"])
    pid = httpx.get(f"{solo.url}/vllama/models/solo", timeout=10).json()["pid"]
    os.kill(pid, signal.SIGKILL)
    expected = f"process {pid} exited (killed by SIGKILL)"
    deadline = time.monotonic() + 60
    while expected not in full_log(solo):
        assert time.monotonic() < deadline, full_log(solo)[-3000:]
        time.sleep(0.5)
    line = next(line for line in full_log(solo).splitlines() if expected in line)
    assert "HTTP/1.1" not in line, line
