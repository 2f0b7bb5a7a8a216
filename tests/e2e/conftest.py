"""One real two-model server for the whole e2e session (vLLM takes ~30 s to start)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .harness import Server, free_port, state_processes, write_config

MODELS = ["tiny-a", "tiny-b"]


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Safety net: whatever a failed test left running is killed at the end of the session
    (the tests themselves assert that nothing is left; this keeps one failure from starving
    the machine for the next run)."""
    yield
    root = str(tmp_path_factory.getbasetemp())
    for p in psutil.process_iter():
        try:
            if p.environ().get("VLLAMA_STATE_DIR", "").startswith(root):
                p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_model_b: Path) -> Iterator[Server]:
    """`vllama serve` with two models (different weights), each on its own vLLM.

    Per module, not per session: a server kept for the whole session would hold ~5 GB of RAM
    while other modules' servers run, and the memory planner rightly refuses models then.
    """
    root = tmp_path_factory.mktemp("e2e")
    cfg = write_config(root / "models.yaml", [
        {"name": "tiny-a", "aliases": ["alpha"], "source": str(tiny_model), "max_model_len": 1024},
        {"name": "tiny-b", "source": str(tiny_model_b), "max_model_len": 1024},
    ])
    srv = Server(config_path=cfg, state_dir=root / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(MODELS)
        yield srv
    finally:
        srv.stop()
        assert state_processes(srv.state_dir) == [], "vLLM or supervisord processes outlived vllama serve"


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    """A second `vllama serve` with `tiny-embed`: the tiny model served with ``--runner pooling``.

    Its own server, not a third model of `server`, so that `server` keeps exactly the two
    models the skeleton tests count. Started only by the tests that embed (one more vLLM,
    ~3 GB of RAM, while they run).
    """
    root = tmp_path_factory.mktemp("e2e-embed")
    cfg = write_config(root / "models.yaml", [
        {"name": "tiny-embed", "source": str(tiny_model), "max_model_len": 1024, "embedding": True},
    ])
    srv = Server(config_path=cfg, state_dir=root / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(["tiny-embed"])
        yield srv
    finally:
        srv.stop()
        assert state_processes(srv.state_dir) == [], "vLLM or supervisord processes outlived vllama serve"
