"""`vllama serve` as a process: a stop signal is obeyed at every stage, boot included; requests
still in flight when server.shutdown_grace is over end cleanly, with an error saying why; a
supervisord that dies under it makes it exit non-zero."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from router import supervisor

try:
    from .conftest import free_port
    from .fake_vllm import FakeVLLM, slow
except ImportError:
    from conftest import free_port
    from fake_vllm import FakeVLLM, slow

# Boot that hangs (as a slow placement or supervisord call would) once supervisord is up.
SLOW_BOOT = """
import asyncio, pathlib, sys
from router import config, serve
from router.lifecycle import Fleet

async def slow_start(self):
    print("booting", flush=True)
    await asyncio.sleep(600)

Fleet.start = slow_start
cfg = config.parse({"models": [{"name": "r", "url": "http://127.0.0.1:9/v1", "source": "r"}]})
sys.exit(serve.main(cfg, serve.Options(state_dir=pathlib.Path(sys.argv[1]), port=int(sys.argv[2]))))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_boot_stops_serve_and_its_supervisord(tmp_path: Path, sig: int) -> None:
    state, port = tmp_path / "run", free_port()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BOOT, str(state), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "booting":
                break
        supervisord = [p for p in psutil.Process(proc.pid).children() if "supervisord" in " ".join(p.cmdline())]
        assert supervisord, "".join(lines)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        out = "".join(lines) + proc.stdout.read()
        assert "stopped before serving" in out
        psutil.wait_procs(supervisord, timeout=10)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in supervisord)
        with socket.socket() as s:  # it never listened
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        proc.kill()
        proc.wait()
        supervisor.kill_stale(state)


# `vllama serve` with a model served at a URL (a FakeVLLM), so no vLLM is started, and one whose
# server never answers (requests wait for it).
SERVE_URL_MODEL = """
import pathlib, sys
from router import config, serve
cfg = config.parse({"server": {"shutdown_grace": float(sys.argv[4])},
                    "models": [{"name": "r", "source": "r", "url": sys.argv[3]},
                               {"name": "dead", "source": "dead", "url": "http://127.0.0.1:9"}]})
sys.exit(serve.main(cfg, serve.Options(state_dir=pathlib.Path(sys.argv[1]), port=int(sys.argv[2]))))
"""


class Serve:
    """`vllama serve` (SERVE_URL_MODEL) as a process, its log in a file."""

    def __init__(self, tmp_path: Path, model_url: str, grace: float) -> None:
        self.state, self.port, self.log_path = tmp_path / "run", free_port(), tmp_path / "serve.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE_URL_MODEL, str(self.state), str(self.port),
                                          model_url, str(grace)], stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def supervisord(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children() if "supervisord" in " ".join(p.cmdline())]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        supervisor.kill_stale(self.state)


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, object], started: asyncio.Event) -> str:
    """The whole body of a streamed answer, read to its end (httpx raises on a cut one)."""
    text = ""
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_text():
            text += chunk
            started.set()
    return text


async def test_streams_past_the_shutdown_grace_end_with_an_error_and_no_traceback(tmp_path: Path) -> None:
    with FakeVLLM("r:latest") as fake:
        # 20 s each, far past the grace; the fourth for the whole answer's second try (`Upstream._send`
        # sends once more on a connection closed before the answer), which is cut too.
        fake.push(*[slow(400, 0.05)] * 4)
        serve = Serve(tmp_path, fake.url, grace=1)
        try:
            serve.wait_listening()
            messages = [{"role": "user", "content": "go"}]
            async with httpx.AsyncClient(base_url=serve.url, timeout=60) as client:
                started = [asyncio.Event(), asyncio.Event()]
                streams = [asyncio.ensure_future(_stream(client, "/api/chat", {"model": "r", "messages": messages},
                                                         started[0])),
                           asyncio.ensure_future(_stream(client, "/v1/chat/completions",
                                                         {"model": "r", "messages": messages, "stream": True},
                                                         started[1]))]
                whole = asyncio.ensure_future(client.post("/api/generate", json={"model": "r", "prompt": "go",
                                                                                 "stream": False}))
                waiting = asyncio.ensure_future(client.post("/api/generate", json={"model": "dead", "prompt": "go"}))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
                while fake.running < 3:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # `waiting` waits for its model by now
                assert not waiting.done()
                serve.proc.send_signal(signal.SIGTERM)
                refused = await asyncio.wait_for(waiting, 5)  # at once, not at the end of the grace
                ollama, openai = await asyncio.wait_for(asyncio.gather(*streams), 30)
                answer = await asyncio.wait_for(whole, 30)
            assert await asyncio.to_thread(serve.proc.wait, 30) == 0
        finally:
            serve.close()
    last = json.loads(ollama.strip().splitlines()[-1])
    assert last == {"error": 'vllama is shutting down: model "r:latest" was stopped while answering'}
    event = json.loads(openai.strip().splitlines()[-1].removeprefix("data: "))
    assert event["error"]["message"] == 'vllama is shutting down: model "r:latest" was stopped while answering'
    assert answer.status_code == 502
    assert refused.status_code == 503 and refused.json()["error"].startswith("vllama is shutting down; model")
    assert answer.json() == {"error": 'vllama is shutting down: model "r:latest" was stopped while answering'}
    log = serve.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert log.count("server.shutdown_grace (1s) is over: ending 3 request(s)") == 1, log
    assert "timeout graceful shutdown exceeded" not in log, log


def test_serve_exits_non_zero_when_supervisord_dies(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "http://127.0.0.1:9", grace=1)
    try:
        serve.wait_listening()
        supervisord = serve.supervisord()
        assert len(supervisord) == 1, serve.log()
        supervisord[0].kill()
        assert serve.proc.wait(timeout=30) == 1, serve.log()
        assert "supervisord is gone" in serve.log()
    finally:
        serve.close()


def test_serve_exits_0_on_sigterm(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "http://127.0.0.1:9", grace=1)
    try:
        serve.wait_listening()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=30) == 0, serve.log()
    finally:
        serve.close()


def test_sighup_reloads_the_registry_file(tmp_path: Path) -> None:
    """SIGHUP re-reads models.yaml, as a save does (here with the watcher off), and says so."""
    registry = tmp_path / "models.yaml"
    port, state = free_port(), tmp_path / "run"
    head = f"server: {{port: {port}, state_dir: {state}, watch: false}}\nmodels:\n"
    registry.write_text(head + "  - {name: a, source: a, url: 'http://127.0.0.1:9'}\n")
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(registry)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                tags = httpx.get(f"{url}/api/tags").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        assert [m["name"] for m in tags["models"]] == ["a:latest"]
        registry.write_text(head + "  - {name: a, source: a, url: 'http://127.0.0.1:9'}\n"
                                   "  - {name: b, source: b, url: 'http://127.0.0.1:9'}\n")
        time.sleep(0.5)
        assert len(httpx.get(f"{url}/api/tags").json()["models"]) == 1  # no watcher: nothing yet
        proc.send_signal(signal.SIGHUP)
        while len(httpx.get(f"{url}/api/tags").json()["models"]) != 2:
            assert time.monotonic() < deadline + 30, log_path.read_text()
            time.sleep(0.1)
        assert f"SIGHUP; reloading {registry}" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            supervisor.kill_stale(state)
