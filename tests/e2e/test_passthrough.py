"""The OpenAI and Anthropic pass-through routes against real vLLM, with the official clients.

Every answer is compared with the same request sent straight to the model's own
vLLM: the router adds nothing and drops nothing (only ids and timestamps differ).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .harness import Server, vllm_port

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "Tell me about the sea"}]


def vllm_url(server: Server, model: str) -> str:
    return f"http://127.0.0.1:{vllm_port(server, model)}"


@pytest.fixture
def oa(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def direct(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_url(server, "tiny-a") + "/v1", api_key="unused", max_retries=0)


def test_chat_completions_match_vllm(oa: openai.OpenAI, direct: openai.OpenAI) -> None:
    mine = oa.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=12, temperature=0)
    theirs = direct.chat.completions.create(model="tiny-a:latest", messages=PROMPT, max_tokens=12, temperature=0)
    assert mine.choices[0].message.content == theirs.choices[0].message.content
    assert mine.usage == theirs.usage
    assert mine.model == "tiny-a:latest"  # the alias-free served name, as vLLM answers
    assert oa.chat.completions.create(model="alpha", messages=PROMPT, max_tokens=12, temperature=0) \
        .choices[0].message.content == theirs.choices[0].message.content


def test_streamed_chat_completions_match_vllm(oa: openai.OpenAI, direct: openai.OpenAI) -> None:
    def run(client: openai.OpenAI, model: str) -> tuple[str, Any]:
        text, usage = "", None
        for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        return text, usage

    assert run(oa, "tiny-a:latest") == run(direct, "tiny-a:latest")


def test_sse_bytes_pass_through_unchanged(server: Server) -> None:
    body = {"model": "tiny-a:latest", "messages": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    def events(url: str) -> list[Any]:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.headers["content-type"].startswith("text/event-stream")
        out = []
        for block in r.text.split("\n\n"):
            if block.startswith("data: {"):
                ev = json.loads(block[6:])
                ev.pop("id"), ev.pop("created")
                out.append(ev)
            elif block:
                out.append(block)
        return out

    assert events(server.url) == events(vllm_url(server, "tiny-a"))


def test_completions(oa: openai.OpenAI, direct: openai.OpenAI) -> None:
    mine = oa.completions.create(model="tiny-b", prompt="Once upon", max_tokens=8, temperature=0)
    assert mine.model == "tiny-b:latest" and mine.usage.completion_tokens == 8
    stream = oa.completions.create(model="tiny-b", prompt="Once upon", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == mine.choices[0].text


def test_models_lists_the_registry(oa: openai.OpenAI) -> None:
    assert {m.id for m in oa.models.list().data} == {"tiny-a:latest", "tiny-b:latest"}
    assert oa.models.retrieve("alpha").id == "tiny-a:latest"


def test_errors(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oa.chat.completions.create(model="nope", messages=PROMPT)
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000"):  # vLLM's own answer, passed on
        oa.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=5000)


def test_anthropic_messages(server: Server) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    msg = client.messages.create(model="alpha", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert msg.model == "tiny-a:latest" and msg.content and msg.usage.output_tokens == 8
    with client.messages.stream(model="tiny-a", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.usage.output_tokens == 8 and text == "".join(b.text for b in final.content if b.type == "text")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])


def test_embeddings(embed_server: Server) -> None:
    mine = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0)
    theirs = openai.OpenAI(base_url=vllm_url(embed_server, "tiny-embed") + "/v1", api_key="unused", max_retries=0)
    a = mine.embeddings.create(model="tiny-embed", input=["The sky is blue", "Grass"])
    b = theirs.embeddings.create(model="tiny-embed:latest", input=["The sky is blue", "Grass"])
    assert [d.embedding for d in a.data] == [d.embedding for d in b.data]
    assert len(a.data[0].embedding) == 256 and a.usage == b.usage
