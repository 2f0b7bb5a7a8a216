"""router.metrics: request accounting, model facts from the fleet, vLLM's metrics re-exported."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import CONTENT_TYPE_LATEST, Metrics, metrics_route, reexport, render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from load_tests.fake_upstream import FakeVLLM, Settings

# Trimmed from a real vLLM 0.32 (CPU) /metrics: counters with _created families,
# a histogram, an info-style gauge, process_* and python_* collectors.
VLLM_TEXT = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12109.0
# HELP python_info Python platform information
# TYPE python_info gauge
python_info{implementation="CPython",major="3",minor="11",patchlevel="7",version="3.11.7"} 1.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 7.31181056e+08
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 6.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="tiny"} 1.7955934150747075e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.045
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="tiny"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 4.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0"} 1.0
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx",model="x"} 2.0
"""


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --- request accounting ---------------------------------------------------------------------


def test_request_lifecycle_counts_once() -> None:
    clock = Clock()
    m = Metrics(process=False, clock=clock)
    t = m.started("tiny:latest", "chat")
    assert value(m, "vllama_requests_in_flight", model="tiny:latest", endpoint="chat") == 1
    clock.t += 0.02
    m.first_token(t)
    clock.t += 0.03
    m.first_token(t)  # only the first counts
    clock.t += 0.5
    m.finished(t, 200, prompt_tokens=7, output_tokens=32)
    m.finished(t, 500)  # a second finish is ignored
    lab = {"model": "tiny:latest", "endpoint": "chat"}
    assert value(m, "vllama_requests_in_flight", **lab) == 0
    assert value(m, "vllama_requests_total", status="200", **lab) == 1
    assert value(m, "vllama_requests_total", status="500", **lab) is None
    assert value(m, "vllama_time_to_first_token_seconds_count", **lab) == 1
    assert value(m, "vllama_time_to_first_token_seconds_sum", **lab) == pytest.approx(0.02)
    assert value(m, "vllama_time_to_first_token_seconds_bucket", le="0.025", **lab) == 1
    assert value(m, "vllama_request_duration_seconds_sum", **lab) == pytest.approx(0.55)
    assert value(m, "vllama_prompt_tokens_total", **lab) == 7
    assert value(m, "vllama_output_tokens_total", **lab) == 32


def test_whole_answer_ttft_is_latency_and_errors_have_no_ttft() -> None:
    clock = Clock()
    m = Metrics(process=False, clock=clock)
    ok = m.started("a", "generate")
    bad = m.started("a", "generate")
    clock.t += 1.5
    ok.finished(200, 3, 4)
    bad.finished(503)
    lab = {"model": "a", "endpoint": "generate"}
    assert value(m, "vllama_time_to_first_token_seconds_count", **lab) == 1
    assert value(m, "vllama_time_to_first_token_seconds_sum", **lab) == pytest.approx(1.5)
    assert value(m, "vllama_request_duration_seconds_count", **lab) == 2
    assert value(m, "vllama_requests_total", status="503", **lab) == 1
    assert value(m, "vllama_requests_in_flight", **lab) == 0


def test_series_are_cached() -> None:
    m = Metrics(process=False)
    assert m.series("a", "chat") is m.series("a", "chat")
    t = m.started("a", "chat")
    t.finished(200)
    t2 = m.started("a", "chat")
    t2.finished(200)
    assert value(m, "vllama_requests_total", model="a", endpoint="chat", status="200") == 2


def test_model_facts_pushed_and_lifecycle_events() -> None:
    m = Metrics(process=False)
    m.state("b", "starting")
    m.queue("b", 3)
    m.restart("b")
    m.restart("b")
    m.evicted("b")
    m.action("stop", "keep_alive 0")
    assert value(m, "vllama_model_state", model="b", state="starting") == 1
    assert value(m, "vllama_model_state", model="b", state="ready") == 0
    assert value(m, "vllama_model_queue_length", model="b") == 3
    assert value(m, "vllama_model_restarts_total", model="b") == 2
    assert value(m, "vllama_model_evictions_total", model="b") == 1
    assert value(m, "vllama_lifecycle_actions_total", action="stop", reason="keep_alive 0") == 1
    assert value(m, "vllama_lifecycle_actions_total", action="evict", reason="make room") == 1


def test_model_facts_read_from_the_fleet() -> None:
    rt = SimpleNamespace(state=SimpleNamespace(value="ready"), waiting=2, inflight=5, restarts=1,
                         base_url="http://127.0.0.1:1")
    m = Metrics(process=False)
    m.attach(SimpleNamespace(runtimes={"tiny:latest": rt}))  # type: ignore[arg-type]
    assert value(m, "vllama_model_state", model="tiny:latest", state="ready") == 1
    assert value(m, "vllama_model_queue_length", model="tiny:latest") == 2
    assert value(m, "vllama_model_in_flight", model="tiny:latest") == 5
    assert value(m, "vllama_model_restarts_total", model="tiny:latest") == 1
    rt.state = SimpleNamespace(value="restarting")
    rt.restarts = 2
    assert value(m, "vllama_model_state", model="tiny:latest", state="restarting") == 1
    assert value(m, "vllama_model_restarts_total", model="tiny:latest") == 2


def test_process_metrics_in_own_registry() -> None:
    from prometheus_client import REGISTRY

    m = Metrics()
    assert m.registry is not REGISTRY
    assert value(m, "process_resident_memory_bytes") is not None
    Metrics()  # a second instance does not clash


# --- vLLM metrics re-exported ----------------------------------------------------------------


def test_reexport_adds_model_label_and_drops_noise() -> None:
    text = reexport({"tiny:latest": VLLM_TEXT, "other": VLLM_TEXT.replace("3.0", "9.0"), "down": None})
    fams = families(text)  # parses: one HELP/TYPE per family, samples together
    assert not any(n.startswith("python_") for n in fams)
    assert "process_resident_memory_bytes" not in fams
    rss = fams["vllm_process_resident_memory_bytes"]
    assert {s.labels["model"] for s in rss.samples} == {"tiny:latest", "other"}
    running = fams["vllm:num_requests_running"]
    assert running.type == "gauge"
    by_model = {s.labels["model"]: s for s in running.samples}
    assert by_model["tiny:latest"].value == 3 and by_model["other"].value == 9
    assert by_model["tiny:latest"].labels["model_name"] == "tiny"
    gen = fams["vllm:generation_tokens"]
    assert gen.type == "counter" and [s.name for s in gen.samples] == ["vllm:generation_tokens_total"] * 2
    assert "vllm:generation_tokens_created" not in fams
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)
    ttft = fams["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert {s.labels.get("le") for s in ttft.samples if s.name.endswith("_bucket")} == {"0.005", "0.04", "+Inf"}
    http = fams["http_requests"]
    assert http.samples[0].labels["model"] == "tiny:latest"
    assert http.samples[0].labels["exported_model"] == "x"
    up = {s.labels["model"]: s.value for s in fams["vllama_upstream_up"].samples}
    assert up == {"tiny:latest": 1, "other": 1, "down": 0}
    assert text.count("# TYPE vllm:num_requests_running ") == 1


def test_reexport_survives_garbage() -> None:
    text = reexport({"bad": "this is { not prometheus", "good": VLLM_TEXT})
    fams = families(text)
    up = {s.labels["model"]: s.value for s in fams["vllama_upstream_up"].samples}
    assert up == {"bad": 0, "good": 1}


def test_label_values_are_escaped() -> None:
    text = reexport({'we"ird\\name': 'x_total{a="1"} 1\n'})
    fams = families(text)
    assert fams["x_total"].samples[0].labels["model"] == 'we"ird\\name'


# --- the route: one scrape shows the router and every model's vLLM ------------------------------


@contextlib.contextmanager
def fake_vllm_thread(model: str) -> Iterator[int]:
    """The fake vLLM on its own loop in a thread (the test client blocks the test's loop)."""
    loop = asyncio.new_event_loop()
    fake = FakeVLLM(Settings(model=model))
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    port = asyncio.run_coroutine_threadsafe(fake.start(), loop).result(5)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(fake.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        loop.close()


async def test_metrics_route_scrapes_each_model() -> None:
    with fake_vllm_thread("tiny:latest") as port:
        async with httpx.AsyncClient(trust_env=False) as client:
            # The test client serves the app from another event loop: the route opens its own
            # httpx client there (in vllama serve it reuses the fleet's pooled one).
            fleet = SimpleNamespace(
                upstream=None,
                runtimes={
                    "tiny:latest": SimpleNamespace(state=SimpleNamespace(value="ready"), waiting=0, inflight=1,
                                                   restarts=0, base_url=f"http://127.0.0.1:{port}"),
                    "stopped:latest": SimpleNamespace(state=SimpleNamespace(value="stopped"), waiting=0,
                                                      inflight=0, restarts=0, base_url="http://127.0.0.1:9"),
                    "gone:latest": SimpleNamespace(state=SimpleNamespace(value="ready"), waiting=0, inflight=0,
                                                   restarts=3, base_url="http://127.0.0.1:9"),
                },
            )
            m = Metrics()
            t = m.started("tiny:latest", "chat")
            t.finished(200, 5, 6)
            app = Litestar(route_handlers=[metrics_route(m, fleet, timeout=0.5)])  # type: ignore[arg-type]
            async with AsyncTestClient(app) as tc:
                r = await tc.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith(CONTENT_TYPE_LATEST.split(";")[0])
            fams = families(r.text)
            assert fams["vllama_requests"].samples[0].value == 1
            up = {s.labels["model"]: s.value for s in fams["vllama_upstream_up"].samples}
            assert up == {"tiny:latest": 1, "gone:latest": 0}  # stopped models are not scraped
            running = fams["vllm:num_requests_running"].samples
            assert [(s.labels["model"], s.labels["model_name"]) for s in running] == [("tiny:latest", "tiny:latest")]
            assert "process_resident_memory_bytes" in fams  # the router's own
            assert "vllm_process_resident_memory_bytes" in fams  # the model's
            restarts = {s.labels["model"]: s.value for s in fams["vllama_model_restarts"].samples
                        if s.name.endswith("_total")}
            assert restarts["gone:latest"] == 3
            # the same scrape with the pooled client, in this loop
            body = (await render(m, client, timeout=0.5)).decode()
            up = {s.labels["model"]: s.value for s in families(body)["vllama_upstream_up"].samples}
            assert up == {"tiny:latest": 1, "gone:latest": 0}


async def test_render_without_models_is_just_the_router() -> None:
    m = Metrics(process=False)
    body = await render(m)
    assert b"vllama_upstream_up" not in body
    assert b"# TYPE vllama_requests_total counter" in body


def test_every_model_state_has_its_gauge() -> None:
    from router.lifecycle import State
    from router.metrics import STATES

    assert sorted(STATES) == sorted(s.value for s in State)


# --- the /v1 pass-through counts what the client got ----------------------------------------


@contextlib.asynccontextmanager
async def passthrough_client(url: str, **model: Any) -> Any:
    """The API as `vllama serve` builds it (metrics on the fleet) with one model at `url`
    (and the other registry keys of `model`)."""
    from router.config import parse
    from router.serve import ServingFleet, api_app
    from router.service import OllamaService
    from router.upstream import Upstream

    config = parse({"models": [{"name": "tiny", "source": "tiny", "url": url, **model}]})
    upstream = Upstream()
    fleet = ServingFleet(config, None, upstream)
    fleet.metrics = Metrics(process=False)
    app = api_app(config, fleet, OllamaService(fleet, upstream), None, "127.0.0.1", [])
    await fleet.start()
    await fleet.refresh()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            yield fleet.metrics, client
    finally:
        await fleet.close()
        await upstream.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_v1_refusal_of_vllm_is_counted_with_its_status(stream: bool) -> None:
    """QA: max_tokens above max_model_len got the client vLLM's 400, and /metrics a 200."""
    from tests.fake_vllm import FakeVLLM
    from tests.fake_vllm import error as refusal

    with FakeVLLM("tiny:latest") as fake:
        fake.push(refusal(400, "'max_tokens' is too large: 3000. This model's maximum context length is 2048"))
        async with passthrough_client(fake.url) as (m, client):
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3000,
                                                           "stream": stream})
            assert r.status_code == 400
            assert value(m, "vllama_requests_total", model="tiny:latest", endpoint="v1/completions",
                         status="400") == 1
            assert value(m, "vllama_requests_total", model="tiny:latest", endpoint="v1/completions",
                         status="200") is None


async def test_v1_streams_are_counted_200_when_whole_and_502_when_vllm_cuts_them() -> None:
    from tests.fake_vllm import FakeVLLM, Script

    with FakeVLLM("tiny:latest") as fake:
        fake.push(Script(tokens=["a", "b"], finish_reason="stop"), Script(tokens=["a", "b", "c"], cut_after=1))
        async with passthrough_client(fake.url) as (m, client):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            whole = await client.post("/v1/chat/completions", json=body)
            assert whole.status_code == 200 and whole.text.endswith("data: [DONE]\n\n")
            cut = await client.post("/v1/chat/completions", json=body)
            assert cut.status_code == 200 and '"error"' in cut.text
            counted = {status: value(m, "vllama_requests_total", model="tiny:latest",
                                     endpoint="v1/chat/completions", status=status) for status in ("200", "502")}
            assert counted == {"200": 1, "502": 1}


@pytest.mark.parametrize(("path", "body"), [("/api/embed", {"input": ["one two", "three"]}),
                                            ("/api/embeddings", {"prompt": "one two"})])
async def test_embeddings_count_their_prompt_tokens(path: str, body: dict[str, Any]) -> None:
    """QA: /api/embed answered prompt_eval_count 8, and /metrics counted no prompt tokens."""
    from tests.fake_vllm import FakeVLLM

    with FakeVLLM("tiny:latest") as fake:
        async with passthrough_client(fake.url, embedding=True) as (m, client):
            r = await client.post(path, json={"model": "tiny", **body})
            assert r.status_code == 200, r.text
            sent = fake.last()["input"]
            tokens = sum(len(str(s).split()) + 1 for s in ([sent] if isinstance(sent, str) else sent))
            endpoint = path.removeprefix("/api/")
            assert value(m, "vllama_prompt_tokens_total", model="tiny:latest", endpoint=endpoint) == tokens
