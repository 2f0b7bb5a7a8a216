"""CORS as Ollama answers it, on the API `vllama serve` builds (serve.api_app).

Browser pages of Ollama's default origins (localhost, 127.0.0.1, 0.0.0.0 on any port,
app://, file://, tauri://, vscode-webview://, vscode-file://) and of `server.origins` may
call the API; a preflight is answered before the API keys (it carries none), the request
that follows still needs its key, and a page of any other origin gets 403 before anything
runs. A reload that changes `server.origins` holds from the next request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from router import config as registry_config
from router.config import ConfigError, parse
from router.cors import Cors

try:
    from .live_api import KEY, registry_file, write
    from .live_api import served as live_served
except ImportError:
    from live_api import KEY, registry_file, write
    from live_api import served as live_served

AUTH = {"enabled": True, "keys_file": "keys.yaml"}
PAGE = "http://localhost:3000"
EVIL = "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return registry_file(tmp_path)


def served(path: Path) -> Any:
    return live_served(path, host="vllama.localhost")  # a name of its own, for the same-host checks


async def preflight(client: httpx.AsyncClient, origin: str, path: str = "/api/chat") -> httpx.Response:
    return await client.options(path, headers={"Origin": origin, **PREFLIGHT})


@pytest.mark.parametrize("auth", [False, True])
async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(registry: Path, auth: bool) -> None:
    write(registry, {"auth": AUTH} if auth else {})
    async with served(registry) as (_, client):
        for path in ("/api/chat", "/v1/chat/completions", "/api/tags"):
            r = await preflight(client, PAGE, path)
            assert r.status_code == 204, (path, r.text)
            assert r.headers["access-control-allow-origin"] == PAGE
            assert "POST" in r.headers["access-control-allow-methods"].split(",")
            allowed = {h.lower() for h in r.headers["access-control-allow-headers"].split(",")}
            assert {"authorization", "content-type", "x-api-key"} <= allowed
            assert r.headers["access-control-max-age"] == "43200"
            assert "Origin" in r.headers["vary"]


@pytest.mark.parametrize("auth", [False, True])
async def test_a_disallowed_origin_gets_403_before_the_keys_and_the_route(registry: Path, auth: bool) -> None:
    write(registry, {"auth": AUTH} if auth else {})
    key = {"Authorization": f"Bearer {KEY}"}
    async with served(registry) as (_, client):
        r = await preflight(client, EVIL)
        assert r.status_code == 403
        assert "access-control-allow-origin" not in r.headers
        assert r.json() == {"error": f"origin '{EVIL}' is not allowed (add it to server.origins)"}
        # The request itself (a page may send a "simple" one without asking first): refused, key or not.
        r = await client.get("/api/tags", headers={"Origin": EVIL, **key})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = await client.get("/v1/models", headers={"Origin": EVIL, **key})
        assert r.status_code == 403 and r.json()["error"]["code"] == 403  # OpenAI's shape on /v1


async def test_the_actual_request_carries_the_origin_and_still_needs_its_key(registry: Path) -> None:
    write(registry, {"auth": AUTH})
    async with served(registry) as (_, client):
        r = await client.get("/api/tags", headers={"Origin": PAGE})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == PAGE  # the page may read why
        r = await client.get("/api/tags", headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == ["r:latest"]
        assert r.headers["access-control-allow-origin"] == PAGE
        assert r.headers["vary"] == "Origin"


async def test_the_actual_request_without_auth(registry: Path) -> None:
    async with served(registry) as (_, client):
        r = await client.get("/api/version", headers={"Origin": "vscode-webview://abc123"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "vscode-webview://abc123"
        r = await client.get("/api/tags")  # curl, SDKs: no Origin, nothing changes
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = await client.get("/api/tags", headers={"Origin": "http://vllama.localhost"})  # the router's own page
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://localhost", True), ("https://localhost:8443", True), ("http://127.0.0.1:5173", True),
    ("http://0.0.0.0:8080", True), ("app://obsidian.md", True), ("file://", True), ("tauri://localhost", True),
    ("vscode-webview://1234", True), ("vscode-file://vscode-app", True), ("HTTP://LOCALHOST:3000", True),
    ("http://localhost.evil.example", False), ("http://127.0.0.1.evil.example", False), ("null", False),
    ("http://192.168.1.5:3000", False), ("chrome-extension://abcdef", False), ("https://evil.example", False),
])
def test_ollamas_default_origins(origin: str, allowed: bool) -> None:
    assert Cors().allows(origin) is allowed


def test_extra_origins_take_ollamas_wildcards() -> None:
    cors = Cors(["https://*.example.com", "chrome-extension://*", "http://192.168.1.5:3000"])
    assert cors.allows("https://chat.example.com") and cors.allows("chrome-extension://abcdef")
    assert cors.allows("http://192.168.1.5:3000") and not cors.allows("http://192.168.1.5:3001")
    assert not cors.allows("https://example.org") and cors.allows("http://localhost:1")  # defaults stay


async def test_a_star_allows_every_origin_with_a_star(registry: Path) -> None:
    write(registry, {"origins": ["*"]})
    async with served(registry) as (_, client):
        r = await preflight(client, EVIL)
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
        r = await client.get("/api/tags", headers={"Origin": EVIL})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


async def test_a_reload_changes_the_origins_at_once(registry: Path) -> None:
    page = "https://chat.example.com"
    async with served(registry) as (fleet, client):
        assert (await preflight(client, page)).status_code == 403

        write(registry, {"origins": ["https://*.example.com"]})
        result = await fleet.reload_file()
        assert result["applied"] is True
        assert result["changes"]["server_applied"] == ["server.origins"]
        assert result["changes"]["restart_needed"] == []
        r = await preflight(client, page)
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == page
        r = await client.get("/api/tags", headers={"Origin": page})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page

        write(registry, {"origins": ["https://chat.example.com/"]})  # never matches: the reload is refused
        result = await fleet.reload_file()
        assert result["applied"] is False and "server.origins[0]" in result["error"]
        assert (await preflight(client, page)).status_code == 204  # the previous origins keep serving

        write(registry, {})
        assert (await fleet.reload_file())["applied"] is True
        assert (await preflight(client, page)).status_code == 403


@pytest.mark.parametrize(("origin", "problem"), [
    ("http://localhost:3000/", "is not an origin"),
    ("https://chat.example.com/app", "is not an origin"),
    ("chat.example.com", "is not an origin"),
    ("http://a.example,http://b.example", "one origin per list item"),
    ("", "is not an origin"),
])
def test_origins_that_can_never_match_are_refused(origin: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"server": {"origins": [origin]}})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("server.origins[0]: ")
    assert problem in e.value.problems[0]


def test_valid_origins_load_and_apply_live() -> None:
    cfg = parse({"server": {"origins": ["*", "https://*.example.com", "chrome-extension://abc", "http://10.0.0.2:*"]}})
    assert cfg.server.origins[1] == "https://*.example.com"
    assert "origins" in registry_config.LIVE_SERVER_KEYS
    assert parse({}).server.origins == []
