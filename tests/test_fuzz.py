"""Fuzzing: schemathesis against the published OpenAPI document, hypothesis against the translation.

Schemathesis: every operation of ``/openapi/openapi.json`` gets a bounded number of
generated requests, valid ones (positive) and invalid ones (negative), sent over HTTP to
the real router (tests/served.py, the protocol and middleware of `vllama serve`) with a
FakeVLLM behind it. Checks: no 5xx, and each response's status, content type, headers and
body as the document describes them. Model names are steered to the registry's (and one
unknown) so that requests get past the lookup and through translation to the fake.

Left out: ``DELETE /api/delete`` (it deletes from the Hugging Face cache of this machine),
``POST /api/pull`` (it downloads), and ``/vllama/models/{name}/logs`` (``follow`` streams forever).

Hypothesis: the translation functions raise nothing but TranslationError on any options,
format, images or request; tool-call arguments survive being streamed in any fragments;
rfc3339 stamps are valid RFC 3339 and exact.

``VLLAMA_FUZZ_EXAMPLES`` scales the number of cases (default 50 per operation and mode).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from router import translate, wire
from router.config import parse_duration
from router.translate import Target, TranslationError

try:
    from .fake_vllm import FakeVLLM
    from .served import ServedRouter
except ImportError:
    from fake_vllm import FakeVLLM
    from served import ServedRouter

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("VLLAMA_FUZZ_EXAMPLES", "50"))
MODELS = ["smart", "plain", "embedder", "smart:latest", "clever", "unknown-model"]
SKIP = {("DELETE", "/api/delete"), ("POST", "/api/pull"), ("GET", "/vllama/models/{name}/logs")}
CASES: dict[str, int] = {}
#: Ollama routes vLLama answers with a deliberate 501 (documented) naming what to do instead.
REFUSALS = {"POST /api/copy", "POST /api/create", "POST /api/push", "POST /api/blobs/{digest}",
            "HEAD /api/blobs/{digest}"}
"""Cases sent per operation and mode (the figures in load_tests/README.md come from here)."""


class SturdyVLLM(FakeVLLM):
    """The fake, answering what it cannot parse with a 400 as vLLM's request validation does
    (the fake's own parsing assumes well-formed OpenAI bodies)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await super().__call__(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - a 400 for any body the fake cannot handle
            if not started:
                await self._json(send, 400, {"error": {"message": f"invalid request: {type(e).__name__}",
                                                       "type": "BadRequestError", "param": None, "code": 400}})


def _document() -> dict[str, Any]:
    """The router's OpenAPI document, built from an app as serve builds it (no server needed)."""
    from router.admin import admin_router, library_routes
    from router.app import create_app
    from router.catalog import Catalog
    from router.config import parse
    from router.lifecycle import Fleet
    from router.service import OllamaService
    from router.upstream import Upstream

    config = parse({})
    upstream = Upstream()
    fleet = Fleet(config, None, upstream)
    app = create_app(OllamaService(fleet, upstream), Catalog(config),
                     extra_routes=[admin_router(fleet), *library_routes(fleet)])
    return app.openapi_schema.to_schema()


def _steered(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with model names drawn from the registry (and one unknown), wherever a model is named."""
    doc = copy.deepcopy(doc)
    names = {"enum": MODELS}
    for title, schema in doc["components"]["schemas"].items():
        props = schema.get("properties") or {}
        if title.endswith("Request"):  # requests only: responses are validated as they are
            for key in ("model", "name"):
                if key in props:
                    props[key] = dict(names)
    for item in doc["paths"].values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for param in op.get("parameters") or ():
                if param.get("in") == "path" and param.get("name") in ("model", "name"):
                    param["schema"] = dict(names)
            body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
            if body and "properties" in body and "model" in body["properties"]:
                body["properties"]["model"] = dict(names)
    return doc


DOCUMENT = _document()
SCHEMA = schemathesis.openapi.from_dict(_steered(DOCUMENT))
OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in SCHEMA.get_all_operations())
              if (op.method.upper(), op.path) not in SKIP}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    """With $VLLAMA_FUZZ_REPORT, write the cases sent per operation there (JSON)."""
    yield
    out = os.environ.get("VLLAMA_FUZZ_REPORT")
    if out and CASES:
        with open(out, "w") as f:
            json.dump({"examples_per_operation": EXAMPLES, "total": sum(CASES.values()), "cases": CASES}, f, indent=1)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVLLM]:
    with SturdyVLLM("smart:latest", names=("plain:latest", "embedder:latest")) as f:
        yield f


@pytest.fixture(scope="module")
def router(fake: FakeVLLM) -> Iterator[ServedRouter]:
    registry = {"server": {"cold_start_timeout": 2}, "models": [
        {"name": "smart", "aliases": ["clever"], "source": "/nonexistent/smart", "url": fake.url,
         "max_model_len": 1024, "tool_call_parser": "hermes", "reasoning_parser": "deepseek_r1"},
        {"name": "plain", "source": "/nonexistent/plain", "url": fake.url, "max_model_len": 512},
        {"name": "embedder", "source": "/nonexistent/embedder", "url": fake.url, "embedding": True},
    ]}
    r = ServedRouter(registry, admin=True, max_body_bytes=4 << 20, max_inflight=256).start()
    yield r
    r.stop()


def test_published_document_is_the_one_fuzzed(router: ServedRouter) -> None:
    import httpx

    served = httpx.get(router.url + "/openapi/openapi.json").json()
    assert served["paths"].keys() == DOCUMENT["paths"].keys()
    gen = served["paths"]["/api/generate"]["post"]["responses"]
    assert gen["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "application/x-ndjson" in gen["200"]["content"]
    assert "Retry-After" in gen["503"]["headers"]
    chat = served["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model", "messages"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["anyOf"][0]["$ref"].endswith("/OpenAIError")
    assert len(OPERATIONS) >= 20


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_schemathesis(router: ServedRouter, label: str, mode: GenerationMode) -> None:
    op = OPERATIONS[label]
    if mode == GenerationMode.NEGATIVE and not (op.body or any(True for _ in op.iter_parameters())):
        pytest.skip("nothing to make invalid")
    refusal = label in REFUSALS
    checks = [content_type_conformance, response_headers_conformance]
    if not refusal:
        checks.append(not_a_server_error)
    if mode == GenerationMode.POSITIVE:  # negative cases may be accepted (unknown keys are ignored, as Ollama does)
        checks += [status_code_conformance, response_schema_conformance]
    key = f"{label} {mode.value}"
    CASES[key] = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        CASES[key] += 1
        response = case.call(base_url=router.url, timeout=30)
        if refusal:  # deliberate and documented: "vLLama does not copy models: ..."
            assert response.status_code == 501, response.text
            assert case.method == "HEAD" or "models.yaml" in response.json()["error"], response.text
        else:
            assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
        assert "Traceback" not in response.text
        case.validate_response(response, checks=checks)

    try:
        run()
    except Unsatisfiable:
        if mode == GenerationMode.NEGATIVE:  # e.g. a lone string path parameter: every value is valid
            pytest.skip("no invalid input can be generated")
        raise
    assert CASES[key] >= 1


# --- hypothesis on the translation ----------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | finite | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
option_dicts = st.fixed_dictionaries({}, optional={
    name: numbers for name in ("num_predict", "temperature", "top_k", "top_p", "min_p", "typical_p", "seed",
                               "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "num_ctx",
                               "num_keep", "num_batch", "num_gpu", "mirostat", "mirostat_tau")
} | {"stop": st.lists(st.text(max_size=5), max_size=3)})
targets = st.builds(Target, name=st.just("m"), max_model_len=st.none() | st.integers(1, 1 << 20),
                    thinking=st.booleans(), tools=st.booleans(), embedding=st.booleans(), label=st.just("m"))
FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@FAST
@given(options=option_dicts, target=targets)
def test_options_raise_only_translation_errors(options: dict[str, Any], target: Target) -> None:
    opts = msgspec.convert(options, wire.Options)
    try:
        out = translate.sampling(opts, target)
    except TranslationError:
        return
    msgspec.json.encode(out)  # what goes to vLLM is plain JSON: no inf/nan, no giant ints
    for key, value in out.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
        if isinstance(value, int):
            assert -(2**63) <= value < 2**63, (key, value)
    if "max_tokens" in out:
        assert 0 < out["max_tokens"] <= (target.max_model_len or 2**63)
    assert 0 <= out.get("temperature", 0) <= translate.MAX_TEMPERATURE
    assert 0 < out.get("top_p", 1) <= 1
    assert out.get("seed", 0) >= 0


@FAST
@given(fmt=json_values)
def test_format_is_a_response_format_or_a_clear_400(fmt: Any) -> None:
    try:
        out = translate.response_format(fmt)
    except TranslationError as e:
        assert "format" in str(e)
        return
    assert out is None or out["type"] in ("json_object", "json_schema")


@FAST
@given(images=st.lists(st.text(max_size=40) | st.binary(max_size=30).map(lambda b: __import__("base64")
                                                                             .b64encode(b).decode()), max_size=3))
def test_images_are_checked_without_surprises(images: list[str]) -> None:
    try:
        translate.check_images(images)
    except TranslationError as e:
        assert str(e).startswith("illegal base64 data in image")


messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": st.none() | st.text(max_size=20)},
    optional={"images": st.lists(st.text(max_size=12), max_size=2), "tool_name": st.text(max_size=5),
              "tool_calls": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
                  {"name": st.text(max_size=5)}, optional={"arguments": st.dictionaries(
                      st.text(max_size=5), json_values, max_size=3) | st.text(max_size=10)})}), max_size=2)}),
    max_size=4)
chat_requests = st.fixed_dictionaries({"model": st.just("m"), "messages": messages}, optional={
    "stream": st.none() | st.booleans(), "format": st.none() | st.sampled_from(["json", "xml", ""]) | json_values,
    "options": option_dicts, "think": st.none() | st.booleans() | st.text(max_size=6),
    "logprobs": st.none() | st.booleans(), "top_logprobs": st.none() | st.integers(-5, 50),
    "tools": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": st.text(max_size=5)})}),
                      max_size=2)})
generate_requests = st.fixed_dictionaries({"model": st.just("m"), "prompt": st.text(max_size=20)}, optional={
    "system": st.none() | st.text(max_size=10), "template": st.none() | st.text(max_size=30),
    "suffix": st.none() | st.text(max_size=5), "raw": st.booleans(), "stream": st.none() | st.booleans(),
    "format": st.none() | json_values, "images": st.lists(st.text(max_size=12), max_size=2),
    "options": option_dicts, "think": st.none() | st.booleans() | st.text(max_size=6),
    "context": st.lists(st.integers(0, 1000), max_size=5), "logprobs": st.none() | st.booleans(),
    "top_logprobs": st.none() | st.integers(-5, 50)})


def _convert(data: dict[str, Any], cls: type) -> Any:
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError:
        return None  # a body the HTTP layer refuses with a 400 before translation


def _translated(data: dict[str, Any], cls: type, make: Callable[[Any], translate.UpstreamCall]) -> translate.UpstreamCall | None:
    """Translate `data` as a request of `cls`; None where it is refused (400 before, or
    TranslationError). What it sends vLLM must be plain JSON."""
    req = _convert(data, cls)
    if req is None:
        return None
    try:
        call = make(req)
    except TranslationError:
        return None
    msgspec.json.encode(call.body)
    return call


@FAST
@given(data=chat_requests, target=targets)
def test_chat_translation_raises_only_translation_errors(data: dict[str, Any], target: Target) -> None:
    call = _translated(data, wire.ChatRequest, lambda req: translate.chat_request(req, target))
    if call is not None:
        assert call.path == "/v1/chat/completions" and call.body["model"] == "m"


@FAST
@given(data=generate_requests, target=targets)
def test_generate_translation_raises_only_translation_errors(data: dict[str, Any], target: Target) -> None:
    call = _translated(data, wire.GenerateRequest, lambda req: translate.generate_request(req, target, None))
    if call is not None:
        assert call.path in ("/v1/chat/completions", "/v1/completions")


@FAST
@given(args=st.dictionaries(st.text(max_size=8), json_values, max_size=5), cuts=st.lists(st.integers(0, 200),
                                                                                        max_size=6),
       name=st.text(min_size=1, max_size=10))
def test_tool_call_arguments_survive_any_fragmentation(args: dict[str, Any], cuts: list[int], name: str) -> None:
    """vLLM streams a call's arguments as string fragments cut anywhere; Ollama's client gets the object."""
    text = json.dumps(args)
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points) if b > a]
    stream = translate.ChatStream("m", translate.Timing(start=0))
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": name}}
    out = []
    for i, piece in enumerate([None, *pieces]):
        tc = head if piece is None else {"index": 0, "function": {"arguments": piece}}
        chunk = stream.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": None}]}, i)
        if chunk is not None:
            out.append(chunk)
    last = stream.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, 99)
    calls = [c for ch in [*out, last] if ch is not None for c in ch.message.tool_calls or ()]
    assert len(calls) == 1
    assert calls[0].function.name == name and calls[0].function.arguments == args and calls[0].id == "call_1"
    # and whole (non-streamed) answers give the same object
    whole = stream.whole({"choices": [{"message": {"tool_calls": [
        {"id": "c", "function": {"name": name, "arguments": text}}]}, "finish_reason": "tool_calls"}]}, 100)
    assert whole.message.tool_calls[0].function.arguments == args


_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


@FAST
@given(ns=st.integers(min_value=0, max_value=253402300799 * 10**9))
def test_rfc3339_is_exact(ns: int) -> None:
    s = translate.rfc3339(ns)
    assert _RFC3339.match(s), s
    secs, frac = divmod(ns, 10**9)
    head, _, rest = s[:-1].partition(".")
    assert datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC) == datetime.fromtimestamp(secs, UTC)
    assert not rest.endswith("0")  # trailing zeros trimmed, as Go writes them
    assert int(rest.ljust(9, "0") if rest else 0) == frac


@FAST
@given(value=st.text(max_size=12) | st.integers() | st.floats(allow_nan=False))  # JSON has no NaN
def test_keep_alive_durations_raise_only_value_errors(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert seconds >= 0
