"""DNS rebinding: on a loopback address the API answers only requests for local host names.

A page that rebinds its own domain to 127.0.0.1 sends same-origin requests (no ``Origin``
for CORS to refuse) whose ``Host`` names its domain: 403 in the path's error shape, before
the keys and the route, as Ollama refuses them. On any other address the check is off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from router.config import parse
from router.hosts import allowed, host_name, is_loopback
from router.serve import ServingFleet, api_app
from router.service import OllamaService
from router.upstream import Upstream

REBOUND = "attacker.example:11434"


@asynccontextmanager
async def served(listen: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API as `vllama serve` builds it, listening (so it believes) on `listen`."""
    config = parse({"models": [{"name": "r", "source": "r", "url": "http://127.0.0.1:9/v1"}]})
    upstream = Upstream()
    fleet = ServingFleet(config, None, upstream)
    app = api_app(config, fleet, OllamaService(fleet, upstream), None, listen, [])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            yield client
    finally:
        await fleet.close()
        await upstream.aclose()


@pytest.mark.parametrize("listen", ["127.0.0.1", "::1", "localhost"])
async def test_a_rebound_host_gets_403_on_a_loopback_address(listen: str) -> None:
    async with served(listen) as client:
        r = await client.get("/api/tags", headers={"Host": REBOUND})
        assert r.status_code == 403
        assert r.json() == {"error": f"host '{REBOUND}' is not allowed: vllama listens on a loopback address "
                                     "and answers only requests for localhost (DNS rebinding protection)"}
        r = await client.post("/v1/chat/completions", headers={"Host": REBOUND}, json={"model": "r"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "PermissionDeniedError"
        r = await client.post("/v1/messages", headers={"Host": REBOUND}, json={"model": "r"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert (await client.get("/", headers={"Host": REBOUND})).status_code == 403  # even the probes


@pytest.mark.parametrize("host", ["localhost:11434", "127.0.0.1:11434", "[::1]:11434", "[::1]", "127.0.0.1",
                                  "LOCALHOST", "app.localhost:3000", "box.local", "host.docker.internal:11434",
                                  "192.168.1.5:11434", "0.0.0.0:11434"])
async def test_local_hosts_are_answered_on_a_loopback_address(host: str) -> None:
    async with served("127.0.0.1") as client:
        r = await client.get("/api/version", headers={"Host": host})
        assert r.status_code == 200, r.text


async def test_no_check_on_other_addresses() -> None:
    async with served("0.0.0.0") as client:
        assert (await client.get("/api/version", headers={"Host": "ollama.example.com"})).status_code == 200


@pytest.mark.parametrize(("header", "name"), [("localhost:11434", "localhost"), ("[::1]:80", "::1"), ("[::1]", "::1"),
                                              ("example.com", "example.com"), ("::1", "::1"), ("", "")])
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(("name", "ok"), [("", True), ("localhost", True), ("127.0.0.2", True), ("10.0.0.1", True),
                                          ("::1", True), ("localhost.", True), ("evil.com", False),
                                          ("localhost.evil.com", False), ("8.8.8.8", False)])
def test_allowed(name: str, ok: bool) -> None:
    assert allowed(name) is ok


@pytest.mark.parametrize(("listen", "loopback"), [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                                  ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                  ("myhost", False)])
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback
