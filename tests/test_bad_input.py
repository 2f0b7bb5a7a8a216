"""Bad input on every route: a 400 (413 for a body over the limit) in the route's error shape,
naming the field; never a 500, never a traceback.

Covered: malformed JSON, wrong types, a missing model, oversized bodies (with and without
Content-Length), invalid base64 images, unknown format types, absurd option values (and the
out-of-range ones Ollama accepts, mapped as its sampler runs them), JSON nested deeper than a
decoder recurses. The router is the real one on a
thread (tests/served.py, body limit 1 MiB) with a FakeVLLM behind.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.config import Server

try:
    from .fake_vllm import FakeVLLM
    from .served import ServedRouter
except ImportError:
    from fake_vllm import FakeVLLM
    from served import ServedRouter

LIMIT = 1 << 20

#: Every route that takes a JSON body, with the error shape it answers in.
BODY_ROUTES = [
    ("POST", "/api/generate", "ollama"),
    ("POST", "/api/chat", "ollama"),
    ("POST", "/api/embed", "ollama"),
    ("POST", "/api/embeddings", "ollama"),
    ("POST", "/api/show", "ollama"),
    ("POST", "/api/pull", "ollama"),
    ("DELETE", "/api/delete", "ollama"),
    ("POST", "/v1/chat/completions", "openai"),
    ("POST", "/v1/completions", "openai"),
    ("POST", "/v1/embeddings", "openai"),
    ("POST", "/v1/messages", "anthropic"),
    ("POST", "/v1/messages/count_tokens", "anthropic"),
]
ROUTE_IDS = [p for _, p, _ in BODY_ROUTES]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVLLM]:
    with FakeVLLM("smart:latest", names=("embedder:latest",)) as f:
        yield f


@pytest.fixture(scope="module")
def router(fake: FakeVLLM) -> Iterator[ServedRouter]:
    registry = {"models": [
        {"name": "smart", "source": "/nonexistent/smart", "url": fake.url, "max_model_len": 1024},
        {"name": "embedder", "source": "/nonexistent/embedder", "url": fake.url, "embedding": True},
    ]}
    r = ServedRouter(registry, admin=True, max_body_bytes=LIMIT).start()
    yield r
    r.stop()


def call(router: ServedRouter, method: str, path: str, body: Any = None, content: Any = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
    return httpx.request(method, router.url + path, content=content, timeout=30,
                         headers={"content-type": "application/json", **(headers or {})})


def message(r: httpx.Response, shape: str) -> str:
    """The error message, checking the body is exactly the route's error shape (and no traceback)."""
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    doc = r.json()
    if shape == "ollama":
        assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
        return doc["error"]
    if shape == "openai":
        assert set(doc) == {"error"} and isinstance(doc["error"]["message"], str), doc
        return doc["error"]["message"]
    assert doc["type"] == "error" and isinstance(doc["error"]["message"], str), doc
    return doc["error"]["message"]


def gen(**kw: Any) -> dict[str, Any]:
    return {"model": "smart", "prompt": "hello", "stream": False, **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "smart", "messages": [{"role": "user", "content": "hello"}], "stream": False, **kw}


# --- malformed bodies, every route ---------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "shape"), BODY_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(("content", "expected"), [
    (b"", "missing request body"),
    (b"{", "invalid JSON"),
    (b"{'model': 'smart'}", "invalid JSON"),
    (b'{"model": "smart",}', "invalid JSON"),
    (b"\xff\xfe\x00{", "invalid JSON"),
    (b'{"model": "sm\xffart"}', "invalid JSON"),
    (b"[]", "Expected `object`, got `array`"),
    (b"5", "Expected `object`, got `int`"),
    (b"null", ""),
    (b'{"model": "smart", "format": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid JSON: nested too deeply"),
    (b'{"model": "smart", "x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}", ""),
], ids=["empty", "truncated", "single-quotes", "trailing-comma", "not-utf8-start", "not-utf8-string", "array",
        "number", "null", "deep-array", "deep-object"])
def test_malformed_bodies_are_400(router: ServedRouter, method: str, path: str, shape: str, content: bytes,
                                  expected: str) -> None:
    r = call(router, method, path, content=content)
    text = message(r, shape)
    assert r.status_code in (400, 404), (r.status_code, text)  # deep-object: valid JSON, so a 404 may follow
    if r.status_code == 400:
        assert text.startswith(expected) or expected in text, text
    else:
        assert content.startswith(b'{"model": "smart", "x"') or content == b"null"


@pytest.mark.parametrize(("method", "path", "shape"), BODY_ROUTES, ids=ROUTE_IDS)
def test_missing_model_is_400(router: ServedRouter, method: str, path: str, shape: str) -> None:
    body = {"prompt": "x", "input": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for b in (body, {**body, "model": ""}):
        r = call(router, method, path, b)
        assert r.status_code == 400 and message(r, shape) == "model is required", r.text


@pytest.mark.parametrize(("method", "path", "shape"), BODY_ROUTES, ids=ROUTE_IDS)
def test_model_of_the_wrong_type_is_400(router: ServedRouter, method: str, path: str, shape: str) -> None:
    for model in (5, ["smart"], {"name": "smart"}, True):
        r = call(router, method, path, {"model": model, "messages": [], "prompt": "x", "input": "x"})
        text = message(r, shape)
        assert r.status_code == 400 and ("model" in text), text


# --- wrong types name the field ------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/api/generate", gen(prompt=5), "prompt: Expected `str | null`, got `int`"),
    ("/api/generate", gen(stream="yes"), "stream: Expected `bool | null`, got `str`"),
    ("/api/generate", gen(options="fast"), "options: Expected `object | null`, got `str`"),
    ("/api/generate", gen(options={"temperature": "hot"}), "options.temperature: Expected `int | float | null`"),
    ("/api/generate", gen(options={"stop": "x"}), "options.stop: Expected `array | null`, got `str`"),
    ("/api/generate", gen(options={"stop": [1]}), "options.stop[0]: Expected `str`, got `int`"),
    ("/api/generate", gen(images="abc"), "images: Expected `array | null`, got `str`"),
    ("/api/generate", gen(images=[5]), "images[0]: Expected `str`, got `int`"),
    ("/api/generate", gen(context=["a"]), "context[0]: Expected `int`, got `str`"),
    ("/api/generate", gen(keep_alive=[1]), "keep_alive: Expected `int | float | str | null`, got `array`"),
    ("/api/generate", gen(think=[True]), "think: Expected `bool | str | null`, got `array`"),
    ("/api/chat", chat(messages="hi"), "messages: Expected `array | null`, got `str`"),
    ("/api/chat", chat(messages=[{"content": "x"}]), "messages[0]: Object missing required field `role`"),
    ("/api/chat", chat(messages=[{"role": "user", "content": 5}]), "messages[0].content: Expected `str | null`"),
    ("/api/chat", chat(tools=[{"function": {}}]), "tools[0].function: Object missing required field `name`"),
    ("/api/chat", chat(tools=[{"function": {"name": "f", "parameters": "x"}}]),
     "tools[0].function.parameters: Expected `object | null`, got `str`"),
    ("/api/chat", chat(top_logprobs=[3]), "top_logprobs: Expected `int | null`, got `array`"),
    ("/api/embed", {"model": "embedder", "input": 5}, "input: Expected `str | array | null`, got `int`"),
    ("/api/embed", {"model": "embedder", "input": ["a", 5]}, "input[1]: Expected `str`, got `int`"),
    ("/api/embed", {"model": "embedder", "input": "x", "dimensions": [5]}, "dimensions: Expected `int | null`"),
    ("/api/embeddings", {"model": "embedder", "prompt": ["x"]}, "prompt: Expected `str | null`, got `array`"),
    ("/api/show", {"model": "smart", "verbose": "yes"}, "verbose: Expected `bool | null`, got `str`"),
    ("/api/pull", {"model": "smart", "stream": "no"}, "stream: Expected `bool | null`, got `str`"),
])
def test_wrong_types_name_the_field(router: ServedRouter, path: str, body: Any, expected: str) -> None:
    r = call(router, "POST", path, body)
    assert r.status_code == 400 and message(r, "ollama").startswith(expected), r.text


def test_bad_query_parameters_name_the_parameter(router: ServedRouter) -> None:
    r = httpx.get(router.url + "/vllama/models/smart/logs", params={"lines": "many"})
    assert r.status_code == 400 and message(r, "ollama") == "lines: Expected `int`, got `str`"


# --- body size -----------------------------------------------------------------------------------


def test_default_body_limit_is_generous_enough_for_images() -> None:
    assert Server().max_body_mb >= 32  # a dozen phone photos, base64-encoded


@pytest.mark.parametrize(("method", "path", "shape"), BODY_ROUTES, ids=ROUTE_IDS)
def test_oversized_bodies_are_413(router: ServedRouter, method: str, path: str, shape: str) -> None:
    big = json.dumps({"model": "smart", "prompt": "x" * (LIMIT + 10)}).encode()
    r = call(router, method, path, content=big)
    assert r.status_code == 413
    assert message(r, shape) == "request body too large: the limit is 1 MiB (server.max_body_mb)"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"model": "smart", "prompt": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.request(method, router.url + path, content=chunks(), timeout=30)
    assert r.status_code == 413 and "too large" in message(r, shape)
    assert call(router, "POST", "/api/generate", gen()).status_code == 200  # and the server is fine


def test_an_image_under_the_limit_goes_through(router: ServedRouter, fake: FakeVLLM) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2000  # ~500 KiB, ~680 KiB in base64
    b64 = base64.b64encode(png).decode()
    r = call(router, "POST", "/api/chat", chat(messages=[{"role": "user", "content": "what?", "images": [b64]}]))
    assert r.status_code == 200, r.text
    part = fake.last()["messages"][0]["content"][1]
    assert part["image_url"]["url"] == "data:image/png;base64," + b64


# --- option and field values ---------------------------------------------------------------------


@pytest.mark.parametrize("image", ["not base64!", "aGVsbG8", "####", "aGVs\nbG8="])
def test_invalid_base64_images_are_400(router: ServedRouter, image: str) -> None:
    for path, body in (("/api/generate", gen(images=[image])),
                       ("/api/chat", chat(messages=[{"role": "user", "content": "x", "images": [image]}]))):
        r = call(router, "POST", path, body)
        assert r.status_code == 400 and message(r, "ollama").startswith("illegal base64 data in image"), r.text


@pytest.mark.parametrize("fmt", ["xml", "JSON ", "yaml", 5, ["json"], True])
def test_unknown_format_types_are_400(router: ServedRouter, fmt: Any) -> None:
    for path, body in (("/api/generate", gen(format=fmt)), ("/api/chat", chat(format=fmt))):
        r = call(router, "POST", path, body)
        assert r.status_code == 400 and "format" in message(r, "ollama"), r.text


@pytest.mark.parametrize("n", [-1, -2, 0, -3, -100, -(2**40), 5, 10**9])
def test_num_predict_special_values_are_fine(router: ServedRouter, fake: FakeVLLM, n: int) -> None:
    r = call(router, "POST", "/api/chat", chat(options={"num_predict": n}))
    assert r.status_code == 200, r.text
    assert fake.last().get("max_tokens") == ({5: 5, 10**9: 1024}.get(n))  # clamped to the context


@pytest.mark.parametrize("n", [1025, 10**6, 2**62])
def test_num_ctx_above_the_served_context_is_clamped_not_refused(router: ServedRouter, fake: FakeVLLM,
                                                                 n: int) -> None:
    """Ollama clamps an oversized num_ctx to what the model supports (and says so in its log):
    the request goes through, and nothing of it reaches vLLM, which would refuse more than 1024."""
    for path, body in (("/api/generate", gen(options={"num_ctx": n})), ("/api/chat", chat(options={"num_ctx": n}))):
        r = call(router, "POST", path, body)
        assert r.status_code == 200 and r.json()["done"], r.text
        sent = fake.last()
        assert "num_ctx" not in json.dumps(sent) and "max_tokens" not in sent


@pytest.mark.parametrize(("options", "expected"), [
    ({"seed": 1e300}, 'option "seed" is out of range'),
    ({"seed": 10**30}, 'option "seed" is out of range'),
    ({"top_k": 1e30}, 'option "top_k" is out of range'),
    ({"num_predict": 1e300}, 'option "num_predict" is out of range'),
    ({"num_ctx": 1e30}, 'option "num_ctx" is out of range'),
])
def test_absurd_option_values_are_400(router: ServedRouter, fake: FakeVLLM, options: dict[str, Any],
                                      expected: str) -> None:
    before = len(fake.requests)
    for path, body in (("/api/generate", gen(options=options)), ("/api/chat", chat(options=options))):
        r = call(router, "POST", path, body)
        assert r.status_code == 400 and message(r, "ollama").startswith(expected), r.text
    assert len(fake.requests) == before  # refused before reaching vLLM


@pytest.mark.parametrize(("options", "sent"), [
    ({"temperature": -1}, {"temperature": 0.0}),
    ({"temperature": 1e6}, {"temperature": 2.0}),
    ({"top_p": 2}, {"top_p": 1.0}),
    ({"top_p": -0.5}, {"top_k": 1}),
    ({"min_p": 3}, {"min_p": 1.0}),
    ({"presence_penalty": 9}, {"presence_penalty": 2.0}),
    ({"frequency_penalty": -9}, {"frequency_penalty": -2.0}),
    ({"repeat_penalty": -1}, {}),
    ({"stop": ["", "x"]}, {"stop": ["x"]}),
])
def test_out_of_range_values_ollama_accepts_reach_vllm_as_ollama_runs_them(
        router: ServedRouter, fake: FakeVLLM, options: dict[str, Any], sent: dict[str, Any]) -> None:
    keys = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "stop")
    for path, body in (("/api/generate", gen(options=options)), ("/api/chat", chat(options=options))):
        r = call(router, "POST", path, body)
        assert r.status_code == 200, r.text
        assert {k: v for k, v in fake.last().items() if k in keys and v not in (None, [])} == sent


def test_number_literals_out_of_float_range_are_400(router: ServedRouter) -> None:
    r = call(router, "POST", "/api/generate", content=b'{"model": "smart", "prompt": "x", '
                                                        b'"options": {"temperature": 1e400}}')
    assert r.status_code == 400 and "out of range" in message(r, "ollama")


@pytest.mark.parametrize(("body", "expected"), [
    (gen(keep_alive="forever"), 'time: invalid duration "forever"'),
    (gen(keep_alive="300"), 'time: missing unit in duration "300"'),
    (gen(keep_alive=""), 'time: invalid duration ""'),
    (gen(think="deeply"), 'invalid think value: "deeply"'),
    (gen(logprobs=True, top_logprobs=99), "top_logprobs must be between 0 and 20"),
    (gen(raw=True, system="s"), "raw mode does not support template, system, or context"),
    (gen(template="{{ range .Messages }}x{{ end }}"), "template uses Go template features"),
])
def test_other_bad_values_are_400(router: ServedRouter, body: Any, expected: str) -> None:
    r = call(router, "POST", "/api/generate", body)
    assert r.status_code == 400 and message(r, "ollama").startswith(expected), r.text


def test_bad_embedding_values_are_400(router: ServedRouter) -> None:
    r = call(router, "POST", "/api/embed", {"model": "embedder", "input": "x", "dimensions": -3})
    assert r.status_code == 400 and message(r, "ollama") == "dimensions must be a positive number, got -3"
    r = call(router, "POST", "/api/embed", {"model": "smart", "input": "x"})
    assert r.status_code == 400 and "does not support embeddings" in message(r, "ollama")


@pytest.mark.parametrize(("context", "expected"), [
    ([-1], "context[0]: Expected `int` >= 0"),
    ([5, -34], "context[1]: Expected `int` >= 0"),
    ([1.5], "context[0]: Expected `int`, got `float`"),
    (["a"], "context[0]: Expected `int`, got `str`"),
])
def test_context_must_be_token_ids(router: ServedRouter, fake: FakeVLLM, context: Any, expected: str) -> None:
    """Checked here, naming the token, rather than vLLM's dump of one validation error per token."""
    fake.reset()
    r = call(router, "POST", "/api/generate", gen(context=context))
    assert r.status_code == 400 and message(r, "ollama") == expected
    assert fake.requests == []


def test_odd_model_names_are_404_not_500(router: ServedRouter) -> None:
    for name in ("\u0000", "a:b:c/d", "../../etc/passwd", "x" * 10_000, "smart:" + "🦙" * 100, " "):
        for method, path, shape in BODY_ROUTES:
            r = call(router, method, path, {"model": name, "prompt": "x", "messages": [], "input": "x"})
            message(r, shape)
            assert r.status_code in (400, 404), (name[:20], path, r.status_code, r.text[:200])
    for path in ("/v1/models/%00", "/v1/models/..%2f..", "/vllama/models/%00"):
        r = httpx.get(router.url + path)
        assert r.status_code in (400, 404) and "Traceback" not in r.text


# --- hostile registry entries (models.yaml is input too) -------------------------------------------


def test_program_names_are_sanitised_and_clashes_refused() -> None:
    """supervisord program names come from model names: only [A-Za-z0-9_.-] survive (the argv and
    env side is tests/test_supervisor.py: one argv element each, never a shell)."""
    import re

    from router.config import ConfigError, parse, program_name

    for name in ("evil;rm -rf /:latest", "a/b:c", "x$(id)`id`:7b", "../../etc:latest", "名前:latest"):
        assert re.fullmatch(r"vllm-[A-Za-z0-9_.-]+", program_name(name)), program_name(name)
    with pytest.raises(ConfigError, match="clashes with"):
        parse({"models": [{"name": "a/b", "source": "x/y"}, {"name": "a_b", "source": "x/z"}]})
    with pytest.raises(ConfigError, match="not a valid model name"):
        parse({"models": [{"name": "bad name\nwith newline", "source": "x/y"}]})
    with pytest.raises(ConfigError, match="must not contain newlines"):
        parse({"models": [{"name": "ok", "source": "x/y", "vllm_args": ["--x\n[program:evil]"]}]})
