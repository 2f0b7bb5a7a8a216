"""`vllama serve` as a process: a stop signal is obeyed at every stage, boot included."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from router import supervisor

try:
    from .conftest import free_port
except ImportError:
    from conftest import free_port

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
