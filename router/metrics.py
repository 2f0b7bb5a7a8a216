"""GET /metrics: the router's own Prometheus metrics plus every vLLM's, in one scrape.

The router's metrics live in a private `CollectorRegistry` (never the global one,
so two apps in one process, or the tests, do not collide). Request accounting is
three calls per request, each O(1) with no label lookups on the hot path (the
labelled children are cached per model and endpoint)::

    t = metrics.started(model, "chat")        # in flight + 1
    metrics.first_token(t)                    # TTFT histogram (streams: first chunk out)
    metrics.finished(t, 200, prompt, output)  # requests{status}, latency, tokens; in flight - 1

Model state, queue length, requests in flight at the model and restarts are read
from the `Fleet` at scrape time (nothing to call); evictions and other lifecycle
actions are events the lifecycle reports (`evicted`, `action`).

Each model's vLLM ``/metrics`` is fetched concurrently at scrape time (short
timeout) and re-exported under vLLM's own names with a ``model`` label added, so
one scrape shows the whole box. vLLM's ``python_*`` series are dropped and its
``process_*`` ones are renamed ``vllm_process_*`` (they would clash with the
router's own); ``vllama_upstream_up{model}`` says whether each scrape worked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from litestar import Response, get
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    import httpx

    from .lifecycle import Fleet

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "Tracker", "metrics_route", "reexport", "render"]

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STATES = ("stopped", "starting", "ready", "unhealthy", "restarting", "stopping", "failed", "missing")
"""Every `lifecycle.State`, one gauge each (tests/test_metrics.py checks they match)."""
#: vLLM scrapes skip models in these states (nothing listens).
_NOT_SERVING = {"stopped", "failed", "missing"}


class _Series:
    """The labelled children of one (model, endpoint), resolved once."""

    __slots__ = ("_requests", "endpoint", "inflight", "latency", "model", "output", "prompt", "statuses", "ttft")

    def __init__(self, m: Metrics, model: str, endpoint: str) -> None:
        self.model = model
        self.endpoint = endpoint
        self.inflight = m.inflight.labels(model, endpoint)
        self.ttft = m.ttft.labels(model, endpoint)
        self.latency = m.latency.labels(model, endpoint)
        self.prompt = m.prompt_tokens.labels(model, endpoint)
        self.output = m.output_tokens.labels(model, endpoint)
        self._requests = m.requests
        self.statuses: dict[int, Any] = {}

    def status(self, code: int) -> Any:
        child = self.statuses.get(code)
        if child is None:
            child = self.statuses[code] = self._requests.labels(self.model, self.endpoint, str(code))
        return child


class Tracker:
    """One request being counted: what `Metrics.started` returns."""

    __slots__ = ("done", "metrics", "series", "start", "ttft")

    def __init__(self, metrics: Metrics, series: _Series, start: float) -> None:
        self.metrics = metrics
        self.series = series
        self.start = start
        self.ttft: float | None = None
        self.done = False

    def first_token(self) -> None:
        self.metrics.first_token(self)

    def finished(self, status: int, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        self.metrics.finished(self, status, prompt_tokens, output_tokens)


class Metrics:
    """The router's metrics. Cheap enough to call on every request (not per token)."""

    def __init__(self, *, process: bool = True, clock: Any = time.perf_counter) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        r = self.registry
        me = ["model", "endpoint"]
        self.requests = Counter("vllama_requests", "Requests answered, by model, endpoint and HTTP status.",
                                [*me, "status"], registry=r)
        self.inflight = Gauge("vllama_requests_in_flight", "Requests being answered now.", me, registry=r)
        self.ttft = Histogram("vllama_time_to_first_token_seconds",
                              "From request received to the first token sent (whole answers: to the answer).",
                              me, buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("vllama_request_duration_seconds", "From request received to the last byte sent.",
                                 me, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllama_prompt_tokens", "Prompt tokens, from vLLM's usage counts.", me,
                                     registry=r)
        self.output_tokens = Counter("vllama_output_tokens", "Generated tokens, from vLLM's usage counts.", me,
                                     registry=r)
        self.evictions = Counter("vllama_model_evictions", "Models stopped to make room for another.", ["model"],
                                 registry=r)
        self.actions = Counter("vllama_lifecycle_actions",
                               "Lifecycle actions (start, stop, restart, evict, unload...) and why.",
                               ["action", "reason"], registry=r)
        self._series: dict[tuple[str, str], _Series] = {}
        # Pushed model facts (used for models the attached fleet does not know, or without a fleet).
        self._state: dict[str, str] = {}
        self._queue: dict[str, int] = {}
        self._restarts: dict[str, int] = {}
        self.fleet: Fleet | None = None
        r.register(_ModelCollector(self))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # --- requests (hot path) -----------------------------------------------------------

    def series(self, model: str, endpoint: str) -> _Series:
        s = self._series.get((model, endpoint))
        if s is None:
            s = self._series[(model, endpoint)] = _Series(self, model, endpoint)
        return s

    def started(self, model: str, endpoint: str) -> Tracker:
        """A request for `model` (its canonical name: never a client's raw string) arrived."""
        s = self.series(model, endpoint)
        s.inflight.inc()
        return Tracker(self, s, self.clock())

    def first_token(self, t: Tracker) -> None:
        """The first token left (or, for a whole answer, the answer): observed once."""
        if t.ttft is None and not t.done:
            t.ttft = self.clock() - t.start
            t.series.ttft.observe(t.ttft)

    def finished(self, t: Tracker, status: int, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """The request ended (answered, failed or cancelled by the client: use 499). Counted once."""
        if t.done:
            return
        t.done = True
        s = t.series
        s.inflight.dec()
        s.status(status).inc()
        s.latency.observe(self.clock() - t.start)
        if status < 400 and t.ttft is None:
            t.ttft = self.clock() - t.start
            s.ttft.observe(t.ttft)
        if prompt_tokens:
            s.prompt.inc(prompt_tokens)
        if output_tokens:
            s.output.inc(output_tokens)

    # --- models and lifecycle ----------------------------------------------------------

    def attach(self, fleet: Fleet) -> None:
        """Read state, queue, in-flight and restarts of every model from `fleet` at scrape time."""
        self.fleet = fleet

    def state(self, model: str, state: str) -> None:
        self._state[model] = str(state)

    def queue(self, model: str, n: int) -> None:
        self._queue[model] = n

    def restart(self, model: str) -> None:
        self._restarts[model] = self._restarts.get(model, 0) + 1

    def evicted(self, model: str) -> None:
        self.evictions.labels(model).inc()
        self.actions.labels("evict", "make room").inc()

    def action(self, kind: str, reason: str) -> None:
        """A lifecycle action; keep `reason` to a short fixed vocabulary (it is a label)."""
        self.actions.labels(kind, reason).inc()

    def models(self) -> Iterator[tuple[str, str, int, int, int, str]]:
        """(model, state, waiting, in flight at the model, restarts, url) for every known model."""
        seen = set()
        if self.fleet is not None:
            for name, rt in self.fleet.runtimes.items():
                seen.add(name)
                yield name, str(getattr(rt.state, "value", rt.state)), rt.waiting, rt.inflight, rt.restarts, \
                    rt.base_url
        for name in sorted({*self._state, *self._queue, *self._restarts} - seen):
            yield name, self._state.get(name, "stopped"), self._queue.get(name, 0), 0, \
                self._restarts.get(name, 0), ""


class _ModelCollector(Collector):
    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily("vllama_model_state", "1 for the state each model is in.",
                                  labels=["model", "state"])
        queue = GaugeMetricFamily("vllama_model_queue_length", "Requests waiting for the model to be ready.",
                                  labels=["model"])
        inflight = GaugeMetricFamily("vllama_model_in_flight", "Requests the model is answering now.",
                                     labels=["model"])
        restarts = CounterMetricFamily("vllama_model_restarts", "Times the model's process was restarted.",
                                       labels=["model"])
        for name, st, waiting, busy, n, _ in self.m.models():
            for s in STATES:
                state.add_metric([name, s], 1.0 if s == st else 0.0)
            queue.add_metric([name], waiting)
            inflight.add_metric([name], busy)
            restarts.add_metric([name], n)
        return [state, queue, inflight, restarts]


# --- vLLM's metrics, re-exported -----------------------------------------------------------

_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "summary": "summary",
          "info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def reexport(texts: Mapping[str, str | None]) -> str:
    """vLLM /metrics texts ({model: text, or None when the scrape failed}) as one exposition.

    Families keep vLLM's names and help; every sample gets ``model="..."`` first (a
    ``model`` label vLLM already set is kept as ``exported_model``). ``python_*``
    families are dropped, ``process_*`` ones renamed ``vllm_process_*``, and
    ``_created`` samples left out. Samples of one family from every model are
    written together, under one HELP/TYPE, as the text format requires.
    """
    families: dict[str, tuple[str, str, list[str]]] = {}
    up = ["# HELP vllama_upstream_up 1 if the model's vLLM /metrics answered this scrape.",
          "# TYPE vllama_upstream_up gauge"]
    for model, text in texts.items():
        up.append(f'vllama_upstream_up{{model="{_esc(model)}"}} {1 if text is not None else 0}')
        if not text:
            continue
        try:
            parsed = list(text_string_to_metric_families(text))
        except Exception:  # noqa: BLE001 - a garbled scrape must not break /metrics
            up[-1] = f'vllama_upstream_up{{model="{_esc(model)}"}} 0'
            continue
        for fam in parsed:
            name = fam.name
            if name.startswith("python_"):
                continue
            rename = name.startswith("process_")
            fname = "vllm_" + name if rename else name
            ftype = _TYPES.get(fam.type, "untyped")
            entry = families.get(fname)
            if entry is None:
                entry = families[fname] = (ftype, fam.documentation, [])
            lines = entry[2]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                sname = "vllm_" + s.name if rename else s.name
                labels = [f'model="{_esc(model)}"']
                for k, v in s.labels.items():
                    labels.append(f'{"exported_model" if k == "model" else k}="{_esc(str(v))}"')
                lines.append(f"{sname}{{{','.join(labels)}}} {floatToGoString(s.value)}")
    out = up
    for fname, (ftype, doc, lines) in families.items():
        if not lines:
            continue
        if ftype == "counter":  # text format 0.0.4 names a counter's family by its sample name
            fname += "_total"
        out.append(f"# HELP {fname} {_help(doc)}")
        out.append(f"# TYPE {fname} {ftype}")
        out.extend(lines)
    return "\n".join(out) + "\n"


async def scrape(client: httpx.AsyncClient, targets: Mapping[str, str], timeout: float = 1.0) -> dict[str, str | None]:
    """GET each ``{model: base_url}``'s /metrics at once; None for a model that did not answer in time."""
    import httpx

    async def one(url: str) -> str | None:
        try:
            r = await client.get(url.rstrip("/") + "/metrics", timeout=timeout)
        except (httpx.HTTPError, OSError):
            return None
        return r.text if r.status_code == 200 else None

    names = list(targets)
    texts = await asyncio.gather(*(one(targets[n]) for n in names))
    return dict(zip(names, texts, strict=True))


async def render(metrics: Metrics, client: httpx.AsyncClient | None = None, timeout: float = 1.0) -> bytes:
    """The whole /metrics body: the router's registry, then every serving model's vLLM metrics."""
    own = generate_latest(metrics.registry)
    targets = {name: url for name, st, _w, _i, _r, url in metrics.models() if url and st not in _NOT_SERVING}
    if not targets:
        return own
    if client is None:
        import httpx

        async with httpx.AsyncClient(trust_env=False) as c:
            texts = await scrape(c, targets, timeout)
    else:
        texts = await scrape(client, targets, timeout)
    return own + reexport(texts).encode()


def metrics_route(metrics: Metrics, fleet: Fleet | None = None, *, timeout: float = 1.0,
                  path: str = "/metrics") -> Any:
    """A Litestar GET handler for `path`, for ``create_app(extra_routes=[...])``.

    Attaches `fleet` (model state etc. read at scrape time) and scrapes each
    model's vLLM with the fleet's pooled client, `timeout` seconds at most.
    """
    if fleet is not None:
        metrics.attach(fleet)

    @get(path, include_in_schema=False, name="metrics")
    async def handler() -> Response[bytes]:
        client = getattr(getattr(fleet, "upstream", None), "client", None)
        body = await render(metrics, client, timeout)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST, status_code=200)

    return handler
