"""Issue 5 in CPU mode, end to end: budgets are checked against the machine's RAM before launch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .harness import Server, free_port, state_processes, write_config

pytestmark = pytest.mark.e2e


def test_check_refuses_a_registry_that_exceeds_ram(tmp_path: Path, tiny_model: Path) -> None:
    cfg = write_config(tmp_path / "models.yaml", [
        {"name": "huge", "source": str(tiny_model), "memory_gb": 100000},
    ])
    res = subprocess.run([sys.executable, "-m", "router.cli", "check", "--config", str(cfg)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 1
    assert "huge:latest" in res.stderr and "does not fit" in res.stderr


def test_serve_starts_what_fits_and_never_launches_what_does_not(tmp_path: Path, tiny_model: Path) -> None:
    cfg = write_config(tmp_path / "models.yaml", [
        {"name": "huge", "source": str(tiny_model), "memory_gb": 100000},
        {"name": "small", "source": str(tiny_model), "max_model_len": 512, "memory_gb": 4},
    ])
    srv = Server(config_path=cfg, state_dir=tmp_path / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(["small"])
        r = httpx.post(srv.url + "/api/generate", json={"model": "huge", "prompt": "hi"}, timeout=30)
        assert r.status_code == 503
        assert "does not fit" in r.json()["error"] and "RAM" in r.json()["error"]
        servers = [" ".join(p.cmdline()) for p in state_processes(srv.state_dir)
                   if "vllm.entrypoints" in " ".join(p.cmdline())]
        assert len(servers) == 1 and "small:latest" in servers[0]
        # the budget is enforced through vLLM's KV cache size
        status = httpx.get(srv.url + "/vllama/models/small").json()
        assert status["memory_budget"] == 4 * 1024**3
        (conf,) = (srv.state_dir / "programs").glob("vllm-small_latest-*.conf")
        assert 'VLLM_CPU_KVCACHE_SPACE="1"' in conf.read_text()  # 4 − weights − 2 GiB runtime → 1 whole GiB
    finally:
        srv.stop()
    assert state_processes(srv.state_dir) == []
