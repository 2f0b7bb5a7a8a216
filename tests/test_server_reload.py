"""A reload applies models.yaml's `server` section while serving, or says a restart is needed.

The API is the one `vllama serve` builds (serve.api_app: keys, body limit and in-flight
cap in front of Litestar), called in process through httpx's ASGI transport; the registry
is a file on disk, reloaded as a save, SIGHUP or `vllama reload` reload it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from router.config import Auth, Server, server_changes
from router.upstream import Timeouts

try:
    from .live_api import KEY, registry_file, served, write
except ImportError:
    from live_api import KEY, registry_file, served, write

BIG = b"x" * (2 << 20)  # 2 MiB


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return registry_file(tmp_path)


def test_server_changes_name_live_keys_and_restart_keys() -> None:
    old = Server()
    new = Server(port=12345, max_body_mb=1, auth=Auth(enabled=True))
    assert server_changes(old, new) == (["max_body_mb", "auth.enabled"], ["port"])
    assert server_changes(old, Server()) == ([], [])


async def test_auth_and_body_limit_apply_at_once_and_port_is_reported(registry: Path) -> None:
    async with served(registry) as (fleet, client):
        assert (await client.get("/api/tags")).status_code == 200
        assert (await client.post("/api/show", content=BIG)).status_code != 413

        write(registry, {"auth": {"enabled": True, "keys_file": "keys.yaml"}, "max_body_mb": 1, "port": 12345})
        result = await fleet.reload_file()

        assert result["applied"] is True
        assert result["changes"]["server_applied"] == ["server.max_body_mb", "server.auth.enabled",
                                                       "server.auth.keys_file"]
        assert result["changes"]["restart_needed"] == ["server.port"]
        assert (await client.get("/api/tags")).status_code == 401
        key = {"Authorization": f"Bearer {KEY}"}
        assert (await client.get("/api/tags", headers=key)).status_code == 200
        too_big = await client.post("/api/show", content=BIG, headers=key)
        assert too_big.status_code == 413 and "1 MiB" in too_big.json()["error"]
        status = (await client.get("/vllama/config", headers=key)).json()
        assert status["reload_error"] is None and status["restart_needed"] == ["server.port"]


async def test_a_restart_key_is_logged_as_a_warning(registry: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with served(registry) as (fleet, _):
        write(registry, {"port": 12345, "host": "0.0.0.0"})
        with caplog.at_level(logging.INFO, logger="vllama.serve"):
            await fleet.reload_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("server.host" in m and "server.port" in m and "restarted" in m for m in warnings), warnings


async def test_auth_without_usable_keys_rejects_the_reload(registry: Path) -> None:
    async with served(registry) as (fleet, client):
        write(registry, {"auth": {"enabled": True, "keys_file": "missing.yaml"}, "max_body_mb": 1})
        result = await fleet.reload_file()

        assert result["applied"] is False and "server.auth" in result["error"] and "missing.yaml" in result["error"]
        assert fleet.config.server.max_body_mb == 64  # the previous registry is still the one in use
        assert (await client.get("/api/tags")).status_code == 200
        assert (await client.post("/api/show", content=BIG)).status_code != 413
        assert "server.auth" in (await client.get("/vllama/config")).json()["reload_error"]


async def test_turning_auth_off_is_a_warning_and_lets_requests_in(registry: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    write(registry, {"auth": {"enabled": True, "keys_file": "keys.yaml"}})
    async with served(registry) as (fleet, client):
        assert (await client.get("/api/tags")).status_code == 401
        write(registry, {})
        with caplog.at_level(logging.WARNING, logger="vllama.serve"):
            assert (await fleet.reload_file())["applied"] is True
        assert (await client.get("/api/tags")).status_code == 200
    assert any("auth is now disabled" in r.getMessage() for r in caplog.records)


async def test_max_inflight_applies_live(registry: Path) -> None:
    async with served(registry) as (fleet, _):
        write(registry, {"max_inflight": 3})
        await fleet.reload_file()
        assert fleet.live is not None and fleet.live.gate.limit == 3


async def test_upstream_timeouts_apply_live(registry: Path) -> None:
    async with served(registry) as (fleet, _):
        write(registry, {"connect_timeout": 2, "first_token_timeout": 30, "between_tokens_timeout": 7})
        result = await fleet.reload_file()
        assert result["changes"]["server_applied"] == ["server.connect_timeout", "server.first_token_timeout",
                                                       "server.between_tokens_timeout"]
        assert result["changes"]["restart_needed"] == []
        assert fleet.upstream.timeouts == Timeouts(connect=2, first_token=30, between_tokens=7)


async def test_a_registry_that_does_not_fit_puts_the_old_settings_back(registry: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async with served(registry) as (fleet, client):
        monkeypatch.setattr(fleet, "_plan_with", lambda *_: SimpleNamespace(problems=["too big"]))
        write(registry, {"auth": {"enabled": True, "keys_file": "keys.yaml"}, "max_body_mb": 1, "first_token_timeout": 9})
        assert (await fleet.reload_file())["applied"] is False
        assert (await client.get("/api/tags")).status_code == 200
        assert (await client.post("/api/show", content=BIG)).status_code != 413
        assert fleet.upstream.timeouts == Timeouts()


async def test_a_chunked_body_over_a_lowered_limit_is_refused(registry: Path) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * (512 << 10)

    async with served(registry) as (fleet, client):
        write(registry, {"max_body_mb": 1})
        await fleet.reload_file()
        r = await client.post("/api/show", content=chunks())
        assert r.status_code == 413
