"""The e2e session's shared servers: each starts once, for every module that uses it.

A vLLM takes 30-60 s to start on 2 cores, so the modules that need the two-model
`server` (or `embed_server`) share one. Their tests run first, one after another, and
each shared server stops after the last test that uses it: one left running would hold
gigabytes of RAM while other modules start servers of their own, and the memory planner
would (rightly) refuse their models.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .harness import Server, free_port, state_processes, write_config

MODELS = ["tiny-a", "tiny-b"]
SHARED = ("embed_server", "server")
"""Session fixtures stopped after their last user (see `pytest_runtest_teardown`)."""

_live: dict[str, Server] = {}
_last_user: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Users of the shared servers first, `embed_server`'s before the others, so that the
    users of each are contiguous; otherwise the order is kept."""
    items.sort(key=lambda item: [name not in getattr(item, "fixturenames", ()) for name in SHARED])


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:  # after deselection (-k, -m): the last test that will run
        for name in SHARED:
            if name in getattr(item, "fixturenames", ()):
                _last_user[name] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    for name in SHARED:
        if _last_user.get(name) == item.nodeid and name in _live:
            _stop(_live.pop(name))


def _stop(srv: Server) -> None:
    srv.stop()
    assert state_processes(srv.state_dir) == [], "vLLM or supervisord processes outlived vllama serve"


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


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_model_b: Path) -> Iterator[Server]:
    """`vllama serve` with two models (different weights), each on its own vLLM (~5 GB of RAM)."""
    root = tmp_path_factory.mktemp("e2e")
    cfg = write_config(root / "models.yaml", [
        {"name": "tiny-a", "aliases": ["alpha"], "source": str(tiny_model), "max_model_len": 1024},
        {"name": "tiny-b", "source": str(tiny_model_b), "max_model_len": 1024},
    ])
    yield from _shared("server", Server(config_path=cfg, state_dir=root / "run", port=free_port()), MODELS)


@pytest.fixture(scope="session")
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
    yield from _shared("embed_server", Server(config_path=cfg, state_dir=root / "run", port=free_port()),
                       ["tiny-embed"])


def _shared(name: str, srv: Server, models: list[str]) -> Iterator[Server]:
    _live[name] = srv
    srv.start()
    try:
        srv.wait_ready(models)
        yield srv
    finally:
        if _live.pop(name, None) is not None:  # not yet stopped after its last user
            _stop(srv)
