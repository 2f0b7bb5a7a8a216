"""Issue 4 end to end: crashes, failures, per-model control and the CLI, with real supervisord and vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from .harness import Server, free_port, held_stream, long_prompt, state_processes, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_model_b: Path) -> Iterator[Server]:
    """Two good models, one whose directory is missing, one whose files vLLM cannot load."""
    root = tmp_path_factory.mktemp("lifecycle")
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["NoSuchArchitecture"]}')
    cfg = write_config(root / "models.yaml", [
        {"name": "tiny-a", "source": str(tiny_model), "max_model_len": 1024},
        {"name": "tiny-b", "source": str(tiny_model_b), "max_model_len": 1024},
        {"name": "missing", "source": str(root / "nowhere"), "load": "on_demand"},
        # memory_gb: its (absent) weights cannot size a budget; vLLM must get to fail on its own
        {"name": "broken", "source": str(broken), "load": "on_demand", "memory_gb": 3},
        {"name": "unsized", "source": str(broken), "load": "on_demand"},
    ])
    text = cfg.read_text().replace("engine:\n", "engine:\n  startretries: 1\n")
    cfg.write_text(text)
    srv = Server(config_path=cfg, state_dir=root / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(["tiny-a", "tiny-b"])
        yield srv
    finally:
        srv.stop()
        assert state_processes(srv.state_dir) == []


def status(server: Server, name: str) -> dict:
    r = httpx.get(f"{server.url}/vllama/models/{name}", timeout=10)
    r.raise_for_status()
    return r.json()


def wait_for(server: Server, name: str, states: set[str], timeout: float = 180, not_pid: int | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(server, name)
        if s["state"] in states and (not_pid is None or s["pid"] != not_pid):
            return s
        time.sleep(0.5)
    raise TimeoutError(f"{name} never reached {states}: {s}")


def generate(server: Server, model: str, n: int = 8) -> httpx.Response:
    return httpx.post(f"{server.url}/api/generate", timeout=300, json={
        "model": model, "prompt": "hello", "stream": False, "options": {"num_predict": n}})


class Hammer(threading.Thread):
    """Requests to one model in a loop, recording every failure."""

    def __init__(self, server: Server, model: str) -> None:
        super().__init__(daemon=True)
        self.server, self.model = server, model
        self.ok, self.failures = 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                r = generate(self.server, self.model, 4)
                if r.status_code == 200 and r.json()["done"]:
                    self.ok += 1
                else:
                    self.failures.append(r.text)
            except httpx.HTTPError as e:
                self.failures.append(repr(e))


def test_kill_9_mid_stream_ends_with_error_line_and_model_comes_back(fleet: Server) -> None:
    others = Hammer(fleet, "tiny-b")
    others.start()
    prompt = long_prompt(fleet, "tiny-a", 1000)
    for _ in range(4):
        before = wait_for(fleet, "tiny-a", {"ready"})
        lines = []
        with httpx.stream("POST", f"{fleet.url}/api/generate", timeout=120, json={
                "model": "tiny-a", "prompt": prompt, "options": {"num_predict": 1000, "temperature": 0}}) as r:
            it = r.iter_lines()
            lines.append(json.loads(next(it)))
            os.kill(before["pid"], signal.SIGKILL)  # ~1000 tokens to go: about a second of work
            lines += [json.loads(line) for line in it if line]
        assert r.status_code == 200
        if not lines[-1].get("done"):
            break
        # A busy CPU can make vLLM deliver a whole answer in one burst, before the kill lands:
        # that server is gone all the same; try again once its replacement is up.
        wait_for(fleet, "tiny-a", {"ready"}, not_pid=before["pid"])
    assert "error" in lines[-1], lines[-3:]
    assert not any(line.get("done") for line in lines)

    # A request sent right away, before the router has seen the crash, waits for the restart.
    assert generate(fleet, "tiny-a").status_code == 200
    after = wait_for(fleet, "tiny-a", {"ready"}, not_pid=before["pid"])
    assert after["restarts"] == before["restarts"] + 1
    assert generate(fleet, "tiny-a").status_code == 200
    others.stop.set()
    others.join()
    assert others.failures == [] and others.ok > 0
    # the killed server's EngineCore and worker did not outlive it (its process group is gone)
    assert [p.pid for p in state_processes(fleet.state_dir) if os.getpgid(p.pid) == before["pid"]] == []
    # the restart's reason is how it ended (supervisord's word), not vLLM's last log line (an access-log line)
    assert fleet.log_path is not None
    told = [line for line in fleet.log_path.read_text().splitlines()
            if f"process {before['pid']} exited" in line]
    assert told and all("(killed by SIGKILL)" in line and "HTTP/1.1" not in line for line in told), told


def test_stop_and_start_one_model_while_the_other_serves(fleet: Server) -> None:
    others = Hammer(fleet, "tiny-a")
    others.start()
    pid = status(fleet, "tiny-b")["pid"]
    # A stream in flight: vLLM's HTTP server waits for it after SIGTERM, so the stop would take
    # engine.stopwaitsecs (20 s, until SIGKILL) unless the router cuts its connection.
    answers: list[httpx.Response] = []
    stop = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{fleet.url}/vllama/models/tiny-b/stop", timeout=60)))
    body = {"model": "tiny-b", "messages": [{"role": "user", "content": "go"}],
            "options": {"num_predict": 3000, "temperature": 0}}
    with held_stream(fleet.url, "tiny-b", "/api/chat", body) as stream:
        stop.start()
        time.sleep(1)  # the stop is under way while the request is in flight
    resumed = time.monotonic()
    stop.join(60)
    stream.join(60)
    took = time.monotonic() - resumed
    assert answers and answers[0].status_code == 200 and answers[0].json()["state"] == "stopped", answers
    assert took < 10, f"stop took {took:.1f}s after vLLM could act (stopwaitsecs is 20)"
    assert not stream.is_alive() and stream.lines and "error" in stream.lines[-1], stream
    assert not psutil.pid_exists(pid)
    refused = generate(fleet, "tiny-b")
    assert refused.status_code == 503 and "stopped by an admin" in refused.json()["error"]

    r = httpx.post(f"{fleet.url}/vllama/models/tiny-b/start", timeout=60)
    assert r.status_code == 202 and r.json()["state"] in ("starting", "ready")
    assert generate(fleet, "tiny-b").status_code == 200  # waits while it starts
    others.stop.set()
    others.join()
    assert others.failures == [] and others.ok > 0


def test_missing_source_fails_with_503_naming_the_cause(fleet: Server) -> None:
    r = generate(fleet, "missing")
    assert r.status_code == 503
    assert "nowhere does not exist" in r.json()["error"]
    assert status(fleet, "missing")["state"] == "failed"


def test_vllm_that_cannot_load_fails_with_its_own_error(fleet: Server) -> None:
    r = generate(fleet, "broken")
    assert r.status_code == 503
    msg = r.json()["error"]
    assert msg.startswith('model "broken:latest" failed')
    s = status(fleet, "broken")
    assert s["state"] == "failed"
    assert "NoSuchArchitecture" in msg or "NoSuchArchitecture" in "\n".join(s["log_tail"])


def test_a_model_that_cannot_be_sized_fails_at_once(fleet: Server) -> None:
    r = generate(fleet, "unsized")
    assert r.status_code == 503 and "cannot size its RAM budget" in r.json()["error"]


def test_ps_json_and_plain_table(fleet: Server) -> None:
    env = {**os.environ, "VLLAMA_HOST": fleet.url}
    out = subprocess.run([sys.executable, "-m", "router.cli", "ps", "--json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    models = {m["name"]: m for m in json.loads(out)}
    assert set(models) == {"tiny-a:latest", "tiny-b:latest", "missing:latest", "broken:latest", "unsized:latest"}
    a = models["tiny-a:latest"]
    assert a["state"] == "ready" and a["port"] and a["pid"] and a["uptime"] >= 0
    assert a["vllm_running"] == 0 and a["vllm_waiting"] == 0
    assert a["memory_used"] > 100 * 1024**2  # a real vLLM process tree
    table = subprocess.run([sys.executable, "-m", "router.cli", "ps"], env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert table[0].split("\t")[:3] == ["NAME", "STATE", "UPTIME"]
    rows = {line.split("\t")[0]: line.split("\t") for line in table[1:]}
    assert rows["tiny-a:latest"][1] == "ready"
    assert rows["missing:latest"][1] == "failed"


def test_logs_command_prints_the_vllm_log(fleet: Server) -> None:
    env = {**os.environ, "VLLAMA_HOST": fleet.url}
    log = max((fleet.state_dir / "logs").glob("vllm-tiny-a_latest*.log"), key=lambda p: p.stat().st_mtime)
    out = subprocess.run([sys.executable, "-m", "router.cli", "logs", "tiny-a", "-n", "3"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 3 and out in log.read_text()  # the end of vLLM's own log (it only grows)
    # Every line of it, when asked for more than it has (the earlier tests sent it hundreds of requests).
    out = subprocess.run([sys.executable, "-m", "router.cli", "logs", "tiny-a", "-n", "10000"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "Application startup complete" in out and log.read_text().startswith(out)


def test_run_one_prompt(fleet: Server) -> None:
    env = {**os.environ, "VLLAMA_HOST": fleet.url}
    res = subprocess.run([sys.executable, "-m", "router.cli", "run", "tiny-a", "say something"], env=env,
                         capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0 and res.stdout.strip()
    bad = subprocess.run([sys.executable, "-m", "router.cli", "run", "nope", "x"], env=env,
                         capture_output=True, text=True, check=False, timeout=60)
    assert bad.returncode == 1 and "not found" in bad.stderr
