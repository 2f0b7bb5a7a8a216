"""Run a real `vllama serve` (real supervisord, real vLLM on CPU) for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml


class BackgroundStream(threading.Thread):
    """A streamed request read on a thread: its JSON lines (Ollama's NDJSON or OpenAI's SSE
    events), and `started` once the first has come, so a test can act (reload, SIGTERM)
    while a generation is in flight (hold the model with `frozen` to keep it there).
    """

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        """What ended the read, if not the end of the stream (shown by failing tests)."""
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
                for line in r.iter_lines():
                    if line and line != "data: [DONE]":
                        self.lines.append(json.loads(line.removeprefix("data: ")))
                        self.started.set()
        except BaseException as e:  # noqa: BLE001 - kept for the test's assertion message
            self.error = e

    def __repr__(self) -> str:
        return f"<stream: {len(self.lines)} lines, last {self.lines[-1:]}, error {self.error!r}>"


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Hold a vLLM server and its engine processes still (SIGSTOP) for the block, then let them
    go on (SIGCONT), whatever happened in it.

    A request to a frozen model stays in flight by construction, however fast the model
    generates and however much the sockets buffer: what a drain or a graceful shutdown must
    wait for. (Pausing the reading client instead let the tiny model finish into the kernel's
    send buffers, which grow to megabytes, before a reload had landed.)
    """
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.suspend()
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()


@contextlib.contextmanager
def held_stream(server_url: str, model: str, path: str, body: dict[str, Any]) -> Iterator[BackgroundStream]:
    """A streamed request to `model` held in flight for the block: sent while its vLLM is
    frozen (`frozen`), so that it waits for its first token until the block ends.

    Freezing vLLM only once a first line had come let a lagging client (a full test run)
    see that line after vLLM had written the whole answer into socket buffers: nothing was
    left in flight to hold. The router counts the request as soon as it has it, frozen or not.
    """
    def inflight() -> int:
        return httpx.get(f"{server_url}/vllama/models/{model}", timeout=10).json()["inflight"]

    pid = httpx.get(f"{server_url}/vllama/models/{model}", timeout=10).json()["pid"]
    with frozen(pid):
        t = BackgroundStream(server_url + path, body)
        deadline = time.monotonic() + 30
        while not inflight():
            assert time.monotonic() < deadline and t.is_alive(), t
            time.sleep(0.05)
        yield t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `vllama serve` child process and what tests need to reach and inspect it."""

    config_path: Path
    state_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path = self.state_dir.parent / f"vllama-{self.port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router.cli", "serve", "--config", str(self.config_path),
                 "--state-dir", str(self.state_dir), "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllama serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"vllama serve did not listen in {timeout}s:\n{self.log()}")

    def wait_ready(self, models: list[str], timeout: float = 300) -> None:
        """Until every model answers a load request (empty prompt) — i.e. is ready."""
        self.wait_listening()
        for m in models:
            r = httpx.post(self.url + "/api/generate", json={"model": m, "stream": False}, timeout=timeout)
            if r.status_code != 200:
                raise RuntimeError(f"{m} did not become ready: {r.status_code} {r.text}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path and self.log_path.exists() else ""

    def tree(self) -> list[psutil.Process]:
        """Every live process of this server: vllama, supervisord, vLLM and its children."""
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def long_prompt(server: Server, model: str, tokens: int) -> str:
    """A prompt whose greedy answer runs for `tokens` tokens: the random test models
    may otherwise stop at their end-of-sequence token after a few."""
    for i in range(40):
        prompt = f"story number {i}"
        r = httpx.post(server.url + "/api/generate", timeout=120, json={
            "model": model, "prompt": prompt, "stream": False, "options": {"num_predict": tokens, "temperature": 0}})
        if r.json().get("done_reason") == "length":
            return prompt
    raise RuntimeError(f"no prompt makes {model} talk for {tokens} tokens")


def vllm_port(server: Server, model: str) -> int:
    """The port of `model`'s own vLLM server (to compare with or bypass the router)."""
    r = httpx.get(f"{server.url}/vllama/models/{model}", timeout=10)
    r.raise_for_status()
    return r.json()["port"]


def state_processes(state_dir: Path) -> list[psutil.Process]:
    """Processes whose environment names this state dir (vLLM children, supervisord)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("VLLAMA_STATE_DIR") == str(state_dir):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def write_config(path: Path, models: list[dict[str, Any]], **sections: Any) -> Path:
    # Each test server gets its own port range for its vLLMs (servers may overlap in time),
    # below Linux's ephemeral range (32768+), where outgoing connections could take a port.
    base_port = random.randrange(20000, 32000, 50)
    data = {
        "engine": {"device": "cpu", "args": ["--enforce-eager"], "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                   "base_port": base_port},
        "models": models,
        **sections,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
