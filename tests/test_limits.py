"""Limits: upstream timeouts, client disconnects, slow-loris clients, backpressure (router/limits.py).

The router is the real one on a thread (tests/served.py) with the protocol and
middleware `vllama serve` uses, in front of fake vLLMs that stall on purpose.
Every wait here is bounded: a hang fails the test by its own timeout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from router.config import parse
from router.limits import BUSY, Gate, guarded_http
from router.upstream import Timeouts, Upstream

try:
    from .fake_vllm import FakeVLLM, slow
    from .served import ServedRouter
except ImportError:
    from fake_vllm import FakeVLLM, slow
    from served import ServedRouter

pytestmark = pytest.mark.timeout(120)


class StallingVLLM(FakeVLLM):
    """A fake vLLM that can stall: ``headers`` (before the first token) or ``tokens`` (after two)."""

    mode: str | None = None

    async def _generate(self, send: Any, receive: Any, req: dict[str, Any], script: Any, chat: bool) -> None:
        if self.mode is None:
            return await super()._generate(send, receive, req, script, chat)
        self.running += 1
        try:
            if req.get("stream"):  # vLLM answers a non-streamed request only once it is done
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
                if self.mode == "tokens":
                    for i in range(2):
                        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                        await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode()
                                    + b"\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnects += 1
        finally:
            self.running -= 1


def running_gauge(fake: FakeVLLM) -> float:
    """vLLM's ``vllm:num_requests_running``, read from the fake's /metrics as from vLLM's."""
    text = httpx.get(fake.url + "/metrics").text
    return float(text.split("vllm:num_requests_running", 1)[1].split()[1])


def wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def fake() -> Iterator[StallingVLLM]:
    with StallingVLLM("stally:latest", names=("cold:latest",)) as f:
        yield f


@pytest.fixture(scope="module")
def cold() -> Iterator[FakeVLLM]:
    """A model server that is up but not healthy: requests to it wait in the model's queue."""
    f = FakeVLLM("cold:latest").start()
    f.healthy = False
    yield f
    f.stop()


@pytest.fixture(scope="module")
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: connecting to it hangs (a connect timeout)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.1)
    yield port
    for c in fillers:
        c.close()
    s.close()


@pytest.fixture(scope="module")
def router(fake: StallingVLLM, cold: FakeVLLM, blackhole: int) -> Iterator[ServedRouter]:
    registry = {"server": {"cold_start_timeout": 4}, "models": [
        {"name": "stally", "source": "/nonexistent/a", "url": fake.url},
        {"name": "cold", "source": "/nonexistent/b", "url": cold.url, "max_queue": 2},
        {"name": "unreachable", "source": "/nonexistent/c", "url": f"http://127.0.0.1:{blackhole}"},
    ]}
    r = ServedRouter(registry, max_inflight=4, timeouts=Timeouts(connect=1.0, first_token=1.5, between_tokens=1.0),
                     header_timeout=1.5, body_timeout=1.0, write_timeout=1.5, max_head_bytes=16 * 1024).start()
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def _reset(fake: StallingVLLM) -> Iterator[None]:
    fake.reset()
    fake.mode = None
    yield
    fake.mode = None


def chat(model: str = "stally", stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


# --- timeouts to vLLM ------------------------------------------------------------------------------


def test_timeouts_come_from_the_config() -> None:
    up = Upstream(Timeouts(connect=1.5, first_token=7.0, between_tokens=3.0))
    try:
        assert (up.timeouts.connect, up.timeouts.first_token, up.timeouts.between_tokens) == (1.5, 7.0, 3.0)
        t = up.client.timeout
        assert (t.connect, t.read) == (1.5, 7.0)
    finally:
        asyncio.run(up.aclose())


@pytest.mark.parametrize("stream", [True, False])
def test_stall_before_the_first_token_is_a_504(router: ServedRouter, fake: StallingVLLM, stream: bool) -> None:
    fake.mode = "headers"
    t0 = time.monotonic()
    r = httpx.post(router.url + "/api/chat", json=chat(stream=stream), timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json() == {"error": f"the model server at {fake.url} timed out"}
    assert 1.4 < took < 6
    wait_for(lambda: running_gauge(fake) == 0, what="vLLM to see the request cancelled")
    assert fake.disconnects == 1


def test_stall_between_tokens_ends_the_stream_with_an_error_line(router: ServedRouter, fake: StallingVLLM) -> None:
    fake.mode = "tokens"
    t0 = time.monotonic()
    r = httpx.post(router.url + "/api/chat", json=chat(), timeout=30)
    took = time.monotonic() - t0
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200
    assert [x["message"]["content"] for x in lines[:-1]] == ["t0 ", "t1 "]
    assert lines[-1] == {"error": f"the model server at {fake.url} timed out"}
    assert 0.9 < took < 6
    wait_for(lambda: running_gauge(fake) == 0, what="vLLM to see the request cancelled")


def test_passthrough_stalls_end_too(router: ServedRouter, fake: StallingVLLM) -> None:
    fake.mode = "headers"  # vLLM sends its headers at once, then the tokens: the stream ends with an error event
    r = httpx.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert r.status_code == 200 and len(events) == 1
    assert json.loads(events[0][5:])["error"] == {"message": f"the model server at {fake.url} timed out",
                                                  "type": "APIError", "param": None, "code": 504}
    r = httpx.post(router.url + "/v1/chat/completions", json=chat(stream=False), timeout=30)
    assert r.status_code in (502, 504) and "timed out" in r.json()["error"]["message"]
    fake.mode = "tokens"
    t0 = time.monotonic()
    r = httpx.post(router.url + "/v1/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 6
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert len(events) == 3 and json.loads(events[-1][5:])["error"]["code"] == 504
    wait_for(lambda: running_gauge(fake) == 0, what="vLLM to see the request cancelled")


def test_connect_timeout(blackhole: int) -> None:
    """A model server that never accepts the connection: 504 after `connect` seconds, streamed or not."""
    from router.upstream import UpstreamError

    async def main() -> list[tuple[int, float]]:
        up = Upstream(Timeouts(connect=0.5, first_token=30, between_tokens=30))
        url = f"http://127.0.0.1:{blackhole}"
        out = []
        try:
            for call in (lambda: up.post_json(url, "/v1/chat/completions", {"stream": False}),
                         lambda: anext(up.events(url, "/v1/chat/completions", {"stream": True})),
                         lambda: up.relay(url, "/v1/chat/completions", b"{}", {})):
                t0 = time.monotonic()
                with pytest.raises(UpstreamError) as e:
                    await call()
                out.append((e.value.status, time.monotonic() - t0))
        finally:
            await up.aclose()
        return out

    for status, took in asyncio.run(main()):
        assert status == 504 and 0.4 < took < 3


def test_unreachable_model_is_a_clear_error_not_a_hang(router: ServedRouter) -> None:
    t0 = time.monotonic()
    r = httpx.post(router.url + "/api/chat", json=chat("unreachable", stream=False), timeout=30)
    assert r.status_code == 503 and r.json()["error"].startswith('model "unreachable:latest" is'), r.text
    assert time.monotonic() - t0 < 10


# --- a client that leaves cancels its upstream request ---------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
def test_client_disconnect_cancels_the_upstream_request(router: ServedRouter, fake: StallingVLLM,
                                                        path: str) -> None:
    fake.push(slow(200, 0.05))
    body = chat() if path != "/api/generate" else {"model": "stally", "prompt": "hi"}
    with httpx.stream("POST", router.url + path, json=body, timeout=30) as r:
        it = r.iter_lines()
        for _ in range(3):
            next(it)
        assert running_gauge(fake) == 1
    wait_for(lambda: running_gauge(fake) == 0, what="vLLM's running gauge to drop")
    assert fake.disconnects == 1


def test_client_disconnect_during_a_non_streamed_request(router: ServedRouter, fake: StallingVLLM) -> None:
    fake.mode = "headers"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/api/chat", json=chat(stream=False), timeout=0.5)
    wait_for(lambda: running_gauge(fake) == 0, what="vLLM's running gauge to drop")
    assert fake.disconnects == 1


# --- backpressure ----------------------------------------------------------------------------------


async def test_inflight_cap_answers_503_with_retry_after(router: ServedRouter, fake: StallingVLLM) -> None:
    """max_inflight = 4: four slow streams hold the server; the fifth request is refused at once."""
    fake.push(*[slow(100, 0.05) for _ in range(4)])
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        streams = [asyncio.create_task(client.post("/api/chat", json=chat())) for _ in range(4)]
        for _ in range(200):
            if fake.running == 4:
                break
            await asyncio.sleep(0.02)
        assert fake.running == 4
        t0 = time.monotonic()
        r = await client.post("/api/chat", json=chat())
        assert time.monotonic() - t0 < 1
        assert (r.status_code, r.json()) == (503, {"error": BUSY})
        assert r.headers["retry-after"] == "1"
        r = await client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503 and r.json()["error"]["message"] == BUSY and "retry-after" in r.headers
        r = await client.get("/api/tags")
        assert r.status_code == 503
        # the probes are never refused
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/api/version")).status_code == 200
        done = await asyncio.gather(*streams)
        assert all(x.status_code == 200 and '"done":true' in x.text for x in done)
        assert (await client.post("/api/chat", json=chat(stream=False))).status_code == 200


async def test_model_queue_cap(router: ServedRouter, cold: FakeVLLM) -> None:
    """A model that is not ready holds at most max_queue (2) waiting requests; more get 503 at once."""
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        waiting = [asyncio.create_task(client.post("/api/chat", json=chat("cold", stream=False)))
                   for _ in range(2)]
        rt = router.fleet.runtimes["cold:latest"]
        for _ in range(200):
            if rt.waiting == 2:
                break
            await asyncio.sleep(0.02)
        assert rt.waiting == 2
        t0 = time.monotonic()
        r = await client.post("/api/chat", json=chat("cold", stream=False))
        assert time.monotonic() - t0 < 1
        assert r.status_code == 503 and "2 requests already waiting" in r.json()["error"]
        assert r.headers["retry-after"] == "5"
        cold.healthy = True  # the model comes up: the queued requests are served
        try:
            done = await asyncio.gather(*waiting)
        finally:
            cold.healthy = False
        assert [x.status_code for x in done] == [200, 200], [x.text for x in done]


async def test_queue_wait_is_bounded(router: ServedRouter) -> None:
    """A model that never becomes ready: the request ends with 503 after cold_start_timeout, never hangs."""
    rt = router.fleet.runtimes["cold:latest"]
    for _ in range(1000):  # the previous test brought it up: wait for the monitor to see it down again
        if rt.state.value != "ready":
            break
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        t0 = time.monotonic()
        r = await client.post("/api/chat", json=chat("cold", stream=False))
        assert r.status_code == 503 and "still" in r.json()["error"] and r.headers.get("retry-after")
        assert 3.5 < time.monotonic() - t0 < 10


def test_gate_counts_only_real_work() -> None:
    with pytest.raises(ValueError):
        Gate(0)

    async def main() -> list[Any]:
        gate = Gate(1)
        sent: list[Any] = []
        release = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await release.wait()

        async def send(m: Any) -> None:
            sent.append(m)

        mw = gate.middleware(app)
        first = asyncio.create_task(mw({"type": "http", "path": "/api/chat"}, None, send))
        await asyncio.sleep(0)
        assert gate.inflight == 1
        await mw({"type": "http", "path": "/api/tags"}, None, send)  # refused
        probe = asyncio.create_task(mw({"type": "http", "path": "/"}, None, send))  # let through
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, probe)
        assert gate.inflight == 0 and gate.refused == 1
        return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]


# --- slow loris ------------------------------------------------------------------------------------


def _connect(router: ServedRouter) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    return s


def _read_all(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return out
        if not data:
            return out
        out += data


def test_headers_sent_byte_by_byte_are_cut_off_and_others_are_served(router: ServedRouter) -> None:
    head = b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10\r\n"
    s = _connect(router)
    stop = threading.Event()
    sent = []

    def trickle() -> None:
        for byte in head:
            if stop.is_set():
                return
            try:
                s.send(bytes([byte]))
            except OSError:
                return
            sent.append(byte)
            time.sleep(0.1)

    t = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    t.start()
    # meanwhile, other clients are served at once
    for _ in range(5):
        t1 = time.monotonic()
        assert httpx.get(router.url + "/api/version").status_code == 200
        assert httpx.post(router.url + "/api/chat", json=chat(stream=False)).status_code == 200
        assert time.monotonic() - t1 < 1.0
    reply = _read_all(s)
    took = time.monotonic() - t0
    stop.set()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"error":"request head not received within 1.5s"' in reply
    assert 1.4 < took < 4 and len(sent) < len(head)
    s.close()


def test_a_body_that_never_finishes_frees_its_slot(router: ServedRouter, fake: StallingVLLM) -> None:
    s = _connect(router)
    s.sendall(b"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
              b'{"model": ')
    t0 = time.monotonic()
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request body stalled for 1s" in reply
    assert 0.9 < time.monotonic() - t0 < 4
    s.close()
    assert fake.requests == []  # nothing reached vLLM
    # the in-flight slot it held is free again: four streams still fit under max_inflight
    wait_for(lambda: httpx.post(router.url + "/api/chat", json=chat(stream=False)).status_code == 200)


def test_idle_connections_are_closed(router: ServedRouter) -> None:
    s = _connect(router)  # says nothing at all
    t0 = time.monotonic()
    assert _read_all(s) == b""
    assert time.monotonic() - t0 < 4
    s.close()
    s = _connect(router)  # one request, then idle on a keep-alive connection (timeout_keep_alive=2)
    s.sendall(b"GET /api/version HTTP/1.1\r\nhost: x\r\n\r\n")
    t0 = time.monotonic()
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 200") and b'"version"' in reply
    assert 1.5 < time.monotonic() - t0 < 5
    s.close()


def test_oversized_request_head_is_431(router: ServedRouter) -> None:
    s = _connect(router)
    try:
        s.sendall(b"GET /api/version HTTP/1.1\r\nhost: x\r\n" + b"x-junk: " + b"a" * 40_000)
    except OSError:
        pass
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    s.close()


def test_many_slow_clients_do_not_block_the_server(router: ServedRouter) -> None:
    socks = []
    for _ in range(50):
        s = _connect(router)
        s.sendall(b"POST /api/chat HTTP/1.1\r\nhost: x\r\n")  # never more
        socks.append(s)
    t0 = time.monotonic()
    r = httpx.post(router.url + "/api/chat", json=chat(stream=False), timeout=10)
    assert r.status_code == 200 and time.monotonic() - t0 < 2
    replies = [_read_all(s) for s in socks]
    assert all(x.startswith(b"HTTP/1.1 408") for x in replies)
    for s in socks:
        s.close()


def test_a_client_that_stops_reading_is_dropped(router: ServedRouter, fake: StallingVLLM) -> None:
    """A stream nobody reads fills the socket buffers; after write_timeout the router drops it
    (and the upstream generation with it) instead of holding them forever."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", router.port))
    body = json.dumps({"model": "stally", "prompt": "x" * 2000, "raw": True,
                       "options": {"num_predict": 200_000}}).encode()
    s.sendall(b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n%b" % (len(body), body))
    wait_for(lambda: fake.running == 1, what="the generation to start")
    wait_for(lambda: fake.running == 0, timeout=60, what="the unread stream to be dropped")
    assert fake.disconnects == 1
    s.close()


def test_guarded_protocol_is_what_serve_uses() -> None:
    from router import serve

    uv = serve.http_config(object(), parse({"models": []}), serve.Options())
    assert isinstance(uv.http, type) and uv.http.__name__ == guarded_http().__name__ == "GuardedHttpToolsProtocol"
    assert (uv.host, uv.port, uv.loop) == ("127.0.0.1", 11434, "uvloop")
