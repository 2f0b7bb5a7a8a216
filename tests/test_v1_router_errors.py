"""The router's own errors on /v1 are in the shape the client's SDK reads (QA finding 12).

An unknown /v1 route or a method it does not take answers OpenAI's ``{"error": {"message",
"type", "param", "code"}}`` (Anthropic's on /v1/messages), as the pass-through's own errors
do; the Ollama routes keep Ollama's ``{"error": "..."}``. /v1/models and /v1/models/{id}
describe a model alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from router.config import load
from router.serve import ServingFleet, api_app
from router.service import OllamaService
from router.upstream import Upstream


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [
        {"name": "long", "source": "r", "url": "http://127.0.0.1:9/v1", "max_model_len": 4096, "aliases": ["l"]},
        {"name": "plain", "source": "r", "url": "http://127.0.0.1:9/v1"},
    ]}))
    config = load(path)
    upstream = Upstream()
    fleet = ServingFleet(config, None, upstream)
    app = api_app(config, fleet, OllamaService(fleet, upstream), None, "127.0.0.1", [])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
            yield c
    finally:
        await fleet.close()
        await upstream.aclose()


def openai_shaped(r: httpx.Response, status: int, message: str) -> None:
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": {"message": message, "type": r.json()["error"]["type"], "param": None,
                                  "code": status}}
    assert r.json()["error"]["type"].endswith("Error")


async def test_an_unknown_v1_route_is_an_openai_404(client: httpx.AsyncClient) -> None:
    openai_shaped(await client.post("/v1/responses", json={"model": "long", "input": "hi"}), 404,
                  "Invalid URL (POST /v1/responses)")
    openai_shaped(await client.get("/v1/nothing/here"), 404, "Invalid URL (GET /v1/nothing/here)")
    openai_shaped(await client.get("/v1"), 404, "Invalid URL (GET /v1)")


async def test_a_method_a_v1_route_does_not_take_is_an_openai_405(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models", json={})
    openai_shaped(r, 405, "Method not allowed (POST /v1/models)")
    assert r.json()["error"]["type"] == "MethodNotAllowedError"
    openai_shaped(await client.get("/v1/chat/completions"), 405, "Method not allowed (GET /v1/chat/completions)")


async def test_anthropic_routes_answer_in_anthropics_shape(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/messages")
    assert r.status_code == 405
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "Method not allowed (GET /v1/messages)"}}


async def test_ollama_routes_keep_ollamas_words(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "404 page not found"}
    r = await client.post("/api/tags", json={})
    assert r.status_code == 405 and r.json() == {"error": "405 method not allowed"}


async def test_a_model_alone_is_described_as_in_the_list(client: httpx.AsyncClient) -> None:
    listed = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert listed["long:latest"]["max_model_len"] == 4096 and "max_model_len" not in listed["plain:latest"]
    for name, model_id in (("long", "long:latest"), ("l", "long:latest"), ("plain:latest", "plain:latest")):
        r = await client.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json() == listed[model_id]
