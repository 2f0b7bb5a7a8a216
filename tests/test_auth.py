"""API keys (router/auth.py): off by default; keys from a file or the environment; per-key models;
admin keys for the admin routes; 401/403 with clear messages; keys never in the logs.

The router is the real one on a thread (tests/served.py) with a FakeVLLM behind it,
called with the official clients (ollama, openai, anthropic) and raw httpx.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import yaml

from router import auth
from router.auth import AuthError, KeyStore, Principal
from router.config import Auth, Server, parse

try:
    from .fake_vllm import FakeVLLM
    from .live_api import KEY, registry_file, served, write
    from .served import ServedRouter
except ImportError:
    from fake_vllm import FakeVLLM
    from live_api import KEY, registry_file, served, write
    from served import ServedRouter

TEAM = "team-key-0123456789abcdef"
INTERN = "intern-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
CI = "ci-key-0123456789abcdef-hashed"
ENV_KEY = "env-key-0123456789abcdef"
ALL_KEYS = (TEAM, INTERN, ADMIN, CI, ENV_KEY)


def keys_file(path: Path, **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "keys": [
            {"name": "team", "key": TEAM},
            {"name": "intern", "key": INTERN, "models": ["clever", "embedder"]},  # an alias of smart, and a name
            {"name": "ci", "sha256": hashlib.sha256(CI.encode()).hexdigest()},
            *extra.get("more", []),
        ],
        "admin_keys": [{"name": "ops", "key": ADMIN}],
    }))
    return path


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVLLM]:
    with FakeVLLM("smart:latest", names=("plain:latest", "embedder:latest")) as f:
        yield f


@pytest.fixture(scope="module")
def router(fake: FakeVLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRouter]:
    path = keys_file(tmp_path_factory.mktemp("auth") / "keys.yaml")
    store = KeyStore.from_config(Auth(enabled=True, keys_file=str(path)), environ={"VLLAMA_API_KEYS": ENV_KEY})
    registry = {"models": [
        {"name": "smart", "aliases": ["clever"], "source": "/nonexistent/smart", "url": fake.url},
        {"name": "plain", "source": "/nonexistent/plain", "url": fake.url},
        {"name": "embedder", "source": "/nonexistent/embedder", "url": fake.url, "embedding": True},
    ]}
    r = ServedRouter(registry, keys=store, admin=True).start()
    yield r
    r.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(router: ServedRouter, path: str, body: Any, key: str | None = None) -> httpx.Response:
    return httpx.post(router.url + path, json=body, headers=bearer(key) if key else {}, timeout=10)


CHAT = {"model": "smart", "messages": [{"role": "user", "content": "hi"}], "stream": False}


# --- configuration -------------------------------------------------------------------------------


def test_off_by_default_and_bound_to_loopback() -> None:
    assert Server().host == "127.0.0.1" and Server().auth.enabled is False
    assert KeyStore.from_config(Auth(), environ={"VLLAMA_API_KEYS": ENV_KEY}) is None
    assert parse({}).server.auth == Auth()


def test_enabled_without_keys_refuses_to_start() -> None:
    with pytest.raises(AuthError, match="no API key is configured"):
        KeyStore.from_config(Auth(enabled=True), environ={})


@pytest.mark.parametrize(("content", "message"), [
    ({"keys": [{"key": "short"}]}, "at least 16 characters"),
    ({"keys": [{"name": "x"}]}, "either key or sha256"),
    ({"keys": [{"sha256": "abc"}]}, "64 hex digits"),
    ({"keys": [{"key": TEAM}, {"key": TEAM}]}, "the same key is given twice"),
    ({"admin_keys": [{"key": ADMIN, "models": ["x"]}]}, "admin keys may use every model"),
    ({"keys": [{"key": TEAM, "role": "x"}]}, "unknown field"),
    ({"keys": "nope"}, "Expected `array`"),
])
def test_bad_keys_files_are_refused_with_the_reason(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(AuthError, match=message) as e:
        KeyStore.from_config(Auth(enabled=True, keys_file=str(path)), environ={})
    assert str(path) in str(e.value)
    assert TEAM not in str(e.value) and ADMIN not in str(e.value)


def test_keys_from_json_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [TEAM], "admin_keys": [ADMIN]}))
    env = {"VLLAMA_API_KEYS": f"{ENV_KEY}:smart|plain, {INTERN}", "VLLAMA_ADMIN_KEYS": CI}
    store = KeyStore.from_config(Auth(enabled=True, keys_file="keys.json"), base_dir=tmp_path, environ=env)
    assert store is not None
    team, admin, limited, full, env_admin = (store.identify(k) for k in (TEAM, ADMIN, ENV_KEY, INTERN, CI))
    assert team is not None and team.models is None and not team.admin and team.name.startswith("key-")
    assert admin is not None and admin.admin
    assert limited is not None and limited.models == frozenset({"smart", "plain"})
    assert full is not None and full.models is None
    assert env_admin is not None and env_admin.admin and env_admin.name.startswith("admin:")
    assert store.identify("nope" * 8) is None and store.identify("") is None and store.identify(None) is None
    # names in logs are hashes of the key, never the key
    assert all(k not in p.name for p in store.principals for k in ALL_KEYS)


def test_identify_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """hmac.compare_digest on equal-length digests, against every key whatever matched first."""
    store = KeyStore.from_config(Auth(enabled=True, keys_file=str(keys_file(tmp_path / "k.yaml"))), environ={})
    assert store is not None
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for key in (TEAM, ADMIN, "wrong-key-0123456789abcdef", TEAM[:-1]):
        calls.clear()
        store.identify(key)
        assert len(calls) == len(store.principals) == 4
        assert all(len(a) == len(b) == 32 for a, b in calls)


def test_allowed_models_follow_aliases_and_reloads() -> None:
    p = Principal("intern", models=frozenset({"clever"}))
    config = parse({"models": [{"name": "smart", "aliases": ["clever"], "source": "x/y"},
                               {"name": "plain", "source": "x/z"}]})
    assert p.may_use(config, "smart") and p.may_use(config, "smart:latest") and p.may_use(config, "clever")
    assert not p.may_use(config, "plain") and not p.may_use(config, "missing")
    renamed = parse({"models": [{"name": "smart", "source": "x/y"}, {"name": "plain", "aliases": ["clever"],
                                                                        "source": "x/z"}]})
    assert p.may_use(renamed, "plain") and not p.may_use(renamed, "smart")


def test_keys_file_is_reread_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(auth, "RELOAD_EVERY", 0.0)
    path = keys_file(tmp_path / "keys.yaml")
    store = KeyStore.from_config(Auth(enabled=True, keys_file=str(path)), environ={})
    assert store is not None and store.identify(TEAM) is not None
    new = "rotated-key-0123456789abcdef"
    time.sleep(0.01)
    path.write_text(yaml.safe_dump({"keys": [{"name": "team", "key": new}]}))
    assert store.identify(new) is not None and store.identify(TEAM) is None
    time.sleep(0.01)
    path.write_text("keys: [{key: short}]")  # broken: the keys in use stay
    with caplog.at_level(logging.ERROR, logger="vllama.auth"):
        assert store.identify(new) is not None
    assert "keys file not reloaded" in caplog.text and new not in caplog.text


# --- over HTTP -------------------------------------------------------------------------------------


def test_probes_need_no_key(router: ServedRouter) -> None:
    assert httpx.get(router.url + "/").text == "Ollama is running"
    assert httpx.head(router.url + "/").status_code == 200
    assert httpx.get(router.url + "/api/version").json() == {"version": "0.12.0"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong-key-0123456789abcdef"), {"Authorization": f"Basic {TEAM}"},
                                     {"Authorization": "Bearer"}, {"Authorization": TEAM}, {"x-api-key": "nope"}])
def test_missing_or_invalid_key_is_401(router: ServedRouter, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/api/chat"), ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"),
                         ("GET", "/vllama/models"), ("POST", "/api/pull"), ("GET", "/openapi/openapi.json")):
        r = httpx.request(method, router.url + path, json=CHAT, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json() == {"error": "missing or invalid API key"}
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(router.url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["message"] == "missing or invalid API key"
    assert r.json()["error"]["type"] == "AuthenticationError"


def test_official_clients_with_a_key(router: ServedRouter) -> None:
    client = ollama.Client(host=router.url, headers=bearer(TEAM))
    assert client.chat(model="plain", messages=[{"role": "user", "content": "hi"}]).message.content
    assert {m.model for m in client.list().models} == {"smart:latest", "plain:latest", "embedder:latest"}
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=router.url).chat(model="plain", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.error == "missing or invalid API key"
    oa = openai.OpenAI(base_url=router.url + "/v1", api_key=TEAM)
    assert oa.chat.completions.create(model="smart", messages=[{"role": "user", "content": "x"}]).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.url + "/v1", api_key="nope").models.list()
    # Anthropic's client sends x-api-key
    msg = anthropic.Anthropic(base_url=router.url, api_key=TEAM).messages.create(
        model="smart", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert msg.content
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=router.url, api_key="nope").messages.create(
            model="smart", max_tokens=8, messages=[{"role": "user", "content": "x"}])


def test_environment_and_hashed_keys_work(router: ServedRouter) -> None:
    assert post(router, "/api/chat", CHAT, ENV_KEY).status_code == 200
    assert post(router, "/api/chat", CHAT, CI).status_code == 200


def test_a_key_limited_to_two_models(router: ServedRouter) -> None:
    """The intern's key: smart (through its alias) and embedder, nothing else."""
    client = ollama.Client(host=router.url, headers=bearer(INTERN))
    assert client.chat(model="smart", messages=[{"role": "user", "content": "hi"}]).message.content
    assert client.chat(model="clever", messages=[{"role": "user", "content": "hi"}]).message.content
    assert client.embed(model="embedder", input="x").embeddings
    for call in (lambda: client.chat(model="plain", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.generate(model="plain", prompt="x"),
                 lambda: client.generate(model="plain", keep_alive=0),  # unloading is using it too
                 lambda: client.embeddings(model="plain", prompt="x"),
                 lambda: client.show("plain")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 403 and e.value.error == 'this API key may not use model "plain"'
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="does-not-exist", prompt="x")
    assert e.value.status_code == 403  # a limited key does not learn which models exist
    assert client.show("clever").capabilities is not None
    assert post(router, "/api/show", {"name": "plain"}, INTERN).status_code == 403  # the legacy key
    # bad bodies still get the handler's own 400
    r = httpx.post(router.url + "/api/chat", content=b"{", headers=bearer(INTERN))
    assert r.status_code == 400 and r.json()["error"].startswith("invalid JSON")
    assert post(router, "/api/chat", {"messages": []}, INTERN).json() == {"error": "model is required"}


def test_limited_key_sees_only_its_models(router: ServedRouter) -> None:
    client = ollama.Client(host=router.url, headers=bearer(INTERN))
    assert {m.model for m in client.list().models} == {"smart:latest", "embedder:latest"}
    assert {m.model for m in client.ps().models} <= {"smart:latest", "embedder:latest"}
    assert len(ollama.Client(host=router.url, headers=bearer(TEAM)).ps().models) == 3
    oa = openai.OpenAI(base_url=router.url + "/v1", api_key=INTERN)
    assert {m.id for m in oa.models.list()} == {"smart:latest", "embedder:latest"}
    assert oa.models.retrieve("clever").id == "smart:latest"
    with pytest.raises(openai.PermissionDeniedError):
        oa.models.retrieve("plain")
    with pytest.raises(openai.PermissionDeniedError) as e:
        oa.chat.completions.create(model="plain", messages=[{"role": "user", "content": "x"}])
    assert 'may not use model "plain"' in str(e.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=router.url, api_key=INTERN).messages.create(
            model="plain", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    r = httpx.get(router.url + "/vllama/models", headers=bearer(INTERN))
    assert sorted(m["name"] for m in r.json()) == ["embedder:latest", "smart:latest"]
    assert httpx.get(router.url + "/vllama/models/plain", headers=bearer(INTERN)).status_code == 403
    assert httpx.get(router.url + "/vllama/models/smart", headers=bearer(INTERN)).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/vllama/reload", None),
    ("POST", "/vllama/models/smart/stop", None),
    ("POST", "/vllama/models/smart/start", None),
    ("POST", "/vllama/models/smart/restart", None),
    ("POST", "/api/pull", {"model": "smart"}),
    ("DELETE", "/api/delete", {"model": "smart"}),
])
def test_admin_routes_need_an_admin_key(router: ServedRouter, method: str, path: str, body: Any) -> None:
    for key in (TEAM, INTERN, ENV_KEY):
        r = httpx.request(method, router.url + path, json=body, headers=bearer(key))
        assert (r.status_code, r.json()) == (403, {"error": "this route needs an admin API key"}), key
    r = httpx.request(method, router.url + path, json=body, headers=bearer(ADMIN))
    assert r.status_code not in (401, 403), r.text  # past the guard: the handler's own answer
    assert "error" not in r.text or "admin" not in r.json()["error"]


def spellings(path: str) -> list[str]:
    """`path` as Litestar routes it too: a trailing slash, a doubled leading or inner slash."""
    head, _, tail = path.rpartition("/")
    return [path + "/", "/" + path, f"{head}//{tail}"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/pull"), ("DELETE", "/api/delete"),
                                             ("POST", "/vllama/models/r/stop")])
async def test_no_spelling_of_an_admin_route_gets_past_the_keys_vllama_serve_puts_in_front(
        tmp_path: Path, method: str, path: str) -> None:
    """As `vllama serve` builds the API (the keys in front of Litestar, serve.LiveServer), not only
    inside it: a non-admin key sent /api/pull/ or //api/pull past the admin check."""
    registry = registry_file(tmp_path)
    write(registry, {"auth": {"enabled": True, "keys_file": "keys.yaml"}})
    async with served(registry) as (_, client):
        for spelt in [path, *spellings(path)]:  # a whole URL: httpx reads a relative "//api" as a host
            r = await client.request(method, f"http://localhost{spelt}", json={"model": "r"}, headers=bearer(KEY))
            assert (r.status_code, r.json()) == (403, {"error": "this route needs an admin API key"}), spelt
        r = await client.get("http://localhost//v1/models")  # no key: 401 in the shape of the API the path is
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"


async def test_no_spelling_of_a_model_route_gets_past_a_keys_models(tmp_path: Path) -> None:
    """The per-key model limits and the filtered listings, as `vllama serve` builds the API."""
    registry = registry_file(tmp_path)
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"name": "team", "key": KEY, "models": ["r"]}]}))
    registry.write_text(yaml.safe_dump({"server": {"auth": {"enabled": True, "keys_file": "keys.yaml"}}, "models": [
        {"name": "r", "source": "r", "url": "http://127.0.0.1:9/v1"},
        {"name": "s", "source": "s", "url": "http://127.0.0.1:9/v1"}]}))
    async with served(registry) as (_, client):
        for spelt in ["/api/generate", *spellings("/api/generate")]:
            r = await client.post(f"http://localhost{spelt}", json={"model": "s", "prompt": "x"}, headers=bearer(KEY))
            assert (r.status_code, r.json()) == (403, {"error": 'this API key may not use model "s"'}), spelt
        for spelt in ["/api/tags", *spellings("/api/tags")]:
            r = await client.get(f"http://localhost{spelt}", headers=bearer(KEY))
            assert [m["name"] for m in r.json()["models"]] == ["r:latest"], spelt


def test_admin_key_may_do_everything(router: ServedRouter) -> None:
    client = ollama.Client(host=router.url, headers=bearer(ADMIN))
    assert client.chat(model="plain", messages=[{"role": "user", "content": "hi"}]).message.content
    assert len(client.list().models) == 3
    assert httpx.get(router.url + "/vllama/models", headers=bearer(ADMIN)).status_code == 200


def test_keys_are_never_logged_nor_forwarded(router: ServedRouter, fake: FakeVLLM,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for key in (*ALL_KEYS, "wrong-key-0123456789abcdef"):
            post(router, "/api/chat", CHAT, key)
            post(router, "/api/chat", {**CHAT, "model": "plain"}, key)
            httpx.post(router.url + "/api/pull", json={"model": "x"}, headers=bearer(key))
            httpx.post(router.url + "/v1/messages", json={"model": "plain", "max_tokens": 1, "messages": []},
                       headers={"x-api-key": key})
    assert "401" in caplog.text and "403" in caplog.text  # refusals are logged...
    assert "intern" in caplog.text  # ... naming the key by its name
    for key in (*ALL_KEYS, "wrong-key-0123456789abcdef"):
        assert key not in caplog.text
    # nor sent on to vLLM: the pass-through forwards a fixed list of headers
    from router.passthrough import _FORWARD

    assert not {"authorization", "x-api-key"} & set(_FORWARD)


def test_serve_refuses_to_start_with_auth_on_and_no_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before supervisord or anything else starts: exit status 2 and the reason in the log."""
    from router import serve

    monkeypatch.delenv("VLLAMA_API_KEYS", raising=False)
    monkeypatch.delenv("VLLAMA_ADMIN_KEYS", raising=False)
    config = parse({"server": {"auth": {"enabled": True}, "watch": False}})
    state = tmp_path / "state"
    assert serve.main(config, serve.Options(state_dir=state, port=1, log_level="warning")) == 2
    assert not state.exists()
