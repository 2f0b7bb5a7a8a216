"""A fast fake vLLM OpenAI server: the upstream for the router-overhead benchmark.

It speaks just enough of vLLM's OpenAI-compatible API for the router (and for
LiteLLM's proxy) to treat it as a real model server:

- ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (SSE,
  chunked transfer encoding, one event per token, the final ``usage`` chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``) and not;
  the bodies have vLLM's shape, field for field;
- ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (a few ``vllm:`` series
  and ``process_*`` ones, in Prometheus text, like vLLM's);

It always generates exactly ``max_tokens`` tokens (EOS is never emitted), by
default as fast as it can (one event per write, yielding to the loop between
tokens so concurrent streams interleave as vLLM's do) or at a fixed rate per
stream (``--rate``). It is a raw asyncio protocol on uvloop with httptools'
C parser and pre-encoded bytes, so it costs a few microseconds per token and is
never the bottleneck of a benchmark it takes part in.

Run: ``python -m load_tests.fake_upstream --port 18000 [--rate 50] [--ttft-ms 0]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import httptools
import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

WORDS = [b" the", b" llama", b" runs", b" fast", b" and", b" far", b" over", b" hills", b",", b" yes"]
CHUNK_END = b"0\r\n\r\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


@dataclass
class Settings:
    model: str = "fake"
    default_tokens: int = 16
    """Tokens generated when a request names no max_tokens."""
    force_tokens: int | None = None
    """Generate exactly this many tokens whatever the request asks."""
    rate: float = 0.0
    """Tokens per second per stream; 0 = as fast as possible."""
    ttft_ms: float = 0.0
    """Delay before the first token (a stand-in for prefill)."""
    burst: int = 1
    """Unlimited rate: tokens written per loop iteration."""


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n\r\n%b"
            % (status, reason, content_type, len(body), body))


def _error(status: int, message: str) -> bytes:
    body = _encode({"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}})
    return _response(status, body)


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A rough, deterministic count: one token per 4 characters of text, at least 1."""
    n = 0
    if "messages" in body:
        for m in body.get("messages") or ():
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                n += len(c) + 8
            elif isinstance(c, list):
                n += sum(len(p.get("text", "")) for p in c if isinstance(p, dict)) + 8
    else:
        p = body.get("prompt", "")
        n = len(p) if isinstance(p, str) else len(str(p))
    return max(1, n // 4)


class FakeVLLM:
    """The server: settings, counters and the listening socket."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.stats = Stats()
        self.ids = itertools.count(1)
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), host, port, backlog=4096, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    # --- bodies ---------------------------------------------------------------------

    def models_body(self) -> bytes:
        return _encode({"object": "list", "data": [{
            "id": self.s.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": self.s.model, "parent": None, "max_model_len": 1024,
            "permission": [],
        }]})

    def metrics_body(self) -> bytes:
        st, m = self.stats, self.s.model
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{m}"}} {st.running}.0\n'
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{m}"}} 0.0\n'
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
            "# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{engine="0",model_name="{m}"}} {st.prompt_tokens}.0\n'
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{engine="0",model_name="{m}"}} {st.generation_tokens}.0\n'
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
            "# TYPE process_resident_memory_bytes gauge\n"
            "process_resident_memory_bytes 1.0e+07\n"
        ).encode()

    def whole(self, chat: bool, model: str, n: int, prompt: int) -> bytes:
        rid = next(self.ids)
        text = b"".join(WORDS[i % len(WORDS)] for i in range(n)).decode()
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n,
                 "prompt_tokens_details": None, "completion_tokens_details": None}
        if chat:
            return _encode({
                "id": f"chatcmpl-{rid:032x}", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                    "function_call": None, "reasoning": None},
                    "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None,
                    "routed_experts": None}],
                "service_tier": None, "system_fingerprint": "vllm-fake", "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            })
        return _encode({
            "id": f"cmpl-{rid:032x}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                         "prompt_token_ids": None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": "vllm-fake", "usage": usage, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None,
        })

    def events(self, chat: bool, model: str, n: int, prompt: int, usage: bool) -> list[bytes]:
        """Every HTTP chunk of one stream, pre-encoded (each one SSE event)."""
        rid = next(self.ids)
        created = int(time.time())
        mj = _encode(model)
        if chat:
            head = b'data: {"id":"chatcmpl-%032x","object":"chat.completion.chunk","created":%d,"model":%b,' % (
                rid, created, mj)
            out = [_chunk(head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                                 b'"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n')]
            tok = head + b'"choices":[{"index":0,"delta":{"content":"%b"},"logprobs":null,"finish_reason":%b%b}]}\n\n'
        else:
            head = b'data: {"id":"cmpl-%032x","object":"text_completion","created":%d,"model":%b,' % (
                rid, created, mj)
            out = []
            tok = head + (b'"choices":[{"index":0,"text":"%b","logprobs":null,"finish_reason":%b%b,'
                          b'"prompt_token_ids":null,"token_ids":null}]}\n\n')
        for i in range(n):
            last = i == n - 1
            if chat:
                tail = b',"stop_reason":null,"token_ids":null' if last else b',"token_ids":null'
            else:
                tail = b',"stop_reason":null'
            out.append(_chunk(tok % (WORDS[i % len(WORDS)], b'"length"' if last else b"null", tail)))
        if usage:
            out.append(_chunk(head + b'"choices":[],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
                                     b'"completion_tokens":%d},"system_fingerprint":"vllm-fake"}\n\n' % (prompt, prompt + n, n)))
        out.append(_chunk(b"data: [DONE]\n\n") + CHUNK_END)
        return out


class _Conn(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer them in order."""

    def __init__(self, app: FakeVLLM) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: list[tuple[bytes, bytes, bytes]] = []
        self.task: asyncio.Task[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self.closed = False

    # protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_error(400, "bad request"))
            self.transport.close()

    # parser callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.append((self.parser.get_method(), self.url.split(b"?", 1)[0], b"".join(self.body)))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._serve())

    # answering
    async def _serve(self) -> None:
        while self.queue and not self.closed:
            method, path, body = self.queue.pop(0)
            await self._answer(method, path, body)

    async def _answer(self, method: bytes, path: bytes, raw: bytes) -> None:
        app, t = self.app, self.transport
        assert t is not None
        if method == b"GET":
            if path == b"/health":
                t.write(_response(200, b""))
            elif path == b"/v1/models":
                t.write(_response(200, app.models_body()))
            elif path == b"/metrics":
                t.write(_response(200, app.metrics_body(), b"text/plain; version=0.0.4; charset=utf-8"))
            elif path == b"/version":
                t.write(_response(200, b'{"version":"fake"}'))
            else:
                t.write(_error(404, "Not Found"))
            return
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/v1/completions"):
            t.write(_error(404 if method == b"POST" else 405, "Not Found"))
            return
        try:
            body = _decode(raw)
            assert isinstance(body, dict)
        except (msgspec.DecodeError, AssertionError):
            t.write(_error(400, "invalid JSON body"))
            return
        chat = path == b"/v1/chat/completions"
        model = body.get("model") or app.s.model
        n = app.s.force_tokens
        if n is None:
            n = body.get("max_completion_tokens") or body.get("max_tokens") or app.s.default_tokens
        n = max(1, int(n))
        prompt = _prompt_tokens(body)
        st = app.stats
        st.requests += 1
        st.running += 1
        st.prompt_tokens += prompt
        try:
            if app.s.ttft_ms:
                await asyncio.sleep(app.s.ttft_ms / 1000)
            if not body.get("stream"):
                if app.s.rate:
                    await asyncio.sleep(n / app.s.rate)
                st.generation_tokens += n
                t.write(_response(200, app.whole(chat, model, n, prompt)))
                return
            so = body.get("stream_options") or {}
            events = app.events(chat, model, n, prompt, bool(so.get("include_usage")))
            t.write(SSE_HEAD)
            await self._stream(events, chat)
            st.generation_tokens += n
        finally:
            st.running -= 1

    async def _stream(self, events: list[bytes], chat: bool) -> None:
        t, s = self.transport, self.app.s
        assert t is not None
        loop = asyncio.get_running_loop()
        # Chat sends the role chunk with the first token, as vLLM does.
        first = 2 if chat else 1
        groups: list[bytes] = [b"".join(events[:first]), *events[first:-2], b"".join(events[-2:])] \
            if len(events) > first + 1 else [b"".join(events)]
        if s.rate > 0:
            step = 1.0 / s.rate
            t0 = loop.time()
            for i, g in enumerate(groups):
                if self.closed:
                    return
                delay = t0 + i * step - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.writable is not None:
                    await self.writable
                t.write(g)
            return
        burst = max(1, s.burst)
        for i in range(0, len(groups), burst):
            if self.closed:
                return
            if self.writable is not None:
                await self.writable
            t.write(b"".join(groups[i:i + burst]) if burst > 1 else groups[i])
            await asyncio.sleep(0)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency through uvicorn[standard]
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: Settings, host: str, port: int, ready: Any = None) -> None:
    app = FakeVLLM(settings)
    bound = await app.start(host, port)
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--model", default="fake", help="the id /v1/models lists (any model name is answered)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens when a request names no max_tokens")
    ap.add_argument("--force-tokens", type=int, help="always generate this many tokens")
    ap.add_argument("--rate", type=float, default=0.0, help="tokens/s per stream (0: as fast as possible)")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    ap.add_argument("--burst", type=int, default=1, help="unlimited rate: tokens per write")
    ap.add_argument("--cpu", type=int, help="pin to this CPU core")
    a = ap.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    install_uvloop()
    s = Settings(model=a.model, default_tokens=a.tokens, force_tokens=a.force_tokens, rate=a.rate,
                 ttft_ms=a.ttft_ms, burst=a.burst)
    asyncio.run(serve(s, a.host, a.port, ready=lambda p: print(f"fake vLLM listening on {a.host}:{p}", flush=True)))


if __name__ == "__main__":
    main()
