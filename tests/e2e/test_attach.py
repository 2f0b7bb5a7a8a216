"""The deployment variant of supervisord.conf: supervisord runs the router, which attaches to it.

The repository's own supervisord.conf, run as its header says, in a directory laid out as
the repository is (a venv, configs/models.yaml, run/): the router serves a real vLLM that
supervisord runs beside it, restarts it when it dies, and stopping supervisord stops all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .harness import Server, free_port, state_processes, vllm_port, write_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_supervisord_conf_runs_the_router_and_its_models(tmp_path: Path, tiny_model: Path) -> None:
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "supervisord").exists() or not (venv / "bin" / "vllama").exists():
        pytest.skip(f"{venv} has no supervisord and vllama scripts (not a venv with the project installed)")
    here = tmp_path / "deploy"
    (here / "configs").mkdir(parents=True)
    (here / ".venv").symlink_to(venv)
    shutil.copy(REPO / "supervisord.conf", here / "supervisord.conf")
    port = free_port()
    write_config(here / "configs" / "models.yaml",
                 [{"name": "tiny", "source": str(tiny_model), "max_model_len": 1024}], server={"port": port})
    run = here / "run"
    (run / "logs").mkdir(parents=True)
    (run / "programs").mkdir()
    run.chmod(0o700)  # as the header says

    sup = subprocess.Popen([str(venv / "bin" / "supervisord"), "-c", str(here / "supervisord.conf")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    router = Server(config_path=here / "configs" / "models.yaml", state_dir=run, port=port, proc=sup,
                    log_path=run / "logs" / "vllama.log")
    try:
        router.wait_ready(["tiny"], timeout=300)
        r = httpx.post(router.url + "/api/generate", timeout=120, json={
            "model": "tiny", "prompt": "hello", "stream": False, "options": {"num_predict": 8, "temperature": 0}})
        assert r.status_code == 200 and r.json()["eval_count"] > 0, r.text

        # Every process is supervisord's child: the router and the model's vLLM side by side.
        children = psutil.Process(sup.pid).children()
        vllm_pid = httpx.get(f"{router.url}/vllama/models/tiny", timeout=10).json()["pid"]
        assert vllm_pid in [c.pid for c in children]
        assert any("serve" in c.cmdline() and "--attach" in c.cmdline() for c in children)

        # A vLLM that dies is started again by the router (supervisord restarts nothing itself).
        os.killpg(vllm_pid, signal.SIGKILL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            info = httpx.get(f"{router.url}/vllama/models/tiny", timeout=10).json()
            if info["state"] == "ready" and info["pid"] not in (None, vllm_pid):
                break
            time.sleep(1)
        else:
            raise AssertionError(f"tiny did not come back: {info}\n{router.log()}")
        assert info["restarts"] >= 1
        r = httpx.post(f"http://127.0.0.1:{vllm_port(router, 'tiny')}/v1/completions", timeout=60,
                       json={"model": "tiny:latest", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text

        # Stopping supervisord stops the router first (it drains), then every vLLM.
        sup.send_signal(signal.SIGTERM)
        sup.wait(120)
        assert [p for p in state_processes(run) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert "stopping models and supervisord" in router.log()
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()
        for p in state_processes(run):
            p.kill()
