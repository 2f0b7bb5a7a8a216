"""The load generator: a lean HTTP/1.1 client that times every request.

Each worker owns one keep-alive connection (an asyncio protocol on uvloop whose
responses are parsed by httptools' C parser, chunked encoding included), so the
client spends a few microseconds per network read and never per token: streamed
chunks are counted with ``bytes.count`` and only the last line (Ollama NDJSON) or
event (OpenAI SSE) is decoded, for the usage counts.

Per request it records the time to the first body bytes of a stream (TTFT: the
first body chunk carries the first token, on vLLM and on the router), the total
latency, the output and prompt tokens from the usage counts, the streamed chunks
and the HTTP status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode

TAIL = 8192
PROMPTS = [
    "Tell me a story about a llama who lives in the mountains.",
    "Why is the sky blue?",
    "Count from one to ten.",
]


@dataclass(frozen=True)
class Target:
    """One thing to load: a base URL, the API it speaks and the model to ask for."""

    name: str
    url: str
    api: str = "openai"
    """``ollama`` or ``openai``."""
    endpoint: str = "chat"
    """ollama: ``generate`` or ``chat``; openai: ``chat`` or ``completions``."""
    model: str = "tiny"
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged into every OpenAI body (e.g. ``ignore_eos``) or Ollama ``options``."""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.url)
        return u.hostname or "127.0.0.1", u.port or 80

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    def path(self) -> str:
        if self.api == "ollama":
            return self.prefix + ("/api/generate" if self.endpoint == "generate" else "/api/chat")
        base = self.prefix if self.prefix.endswith("/v1") else self.prefix + "/v1"
        return base + ("/completions" if self.endpoint == "completions" else "/chat/completions")

    def body(self, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
        if self.api == "ollama":
            b: dict[str, Any] = {"model": self.model, "stream": stream,
                                 "options": {"num_predict": max_tokens, "temperature": 0, **self.extra}}
            if self.endpoint == "generate":
                b["prompt"] = prompt
            else:
                b["messages"] = [{"role": "user", "content": prompt}]
            return b
        b = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **self.extra}
        if stream:
            b["stream_options"] = {"include_usage": True}
        if self.endpoint == "completions":
            b["prompt"] = prompt
        else:
            b["messages"] = [{"role": "user", "content": prompt}]
        return b

    def request(self, prompt: str, max_tokens: int, stream: bool) -> bytes:
        body = _encode(self.body(prompt, max_tokens, stream))
        host, port = self.host_port
        head = [f"POST {self.path()} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json",
                f"content-length: {len(body)}", "accept: */*"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    """One request, as the client saw it. Times in seconds."""

    ok: bool
    status: int
    latency: float
    ttft: float | None
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    error: str | None = None


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self._reset(False)

    def _reset(self, stream: bool) -> None:
        self.stream = stream
        self.first: float | None = None
        self.parts: list[bytes] = []
        self.tail = b""
        self.nl = 0
        self.status = 0
        self.keep = True

    # asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover
            pass
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"bad HTTP response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(ConnectionError("connection closed by the server"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    # httptools
    def on_body(self, body: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if self.stream:
            # count line ends: NDJSON lines end with \n, SSE events with \n\n (counted as 2)
            self.nl += body.count(b"\n")
            self.tail = (self.tail + body)[-TAIL:] if len(body) < TAIL else body[-TAIL:]
        else:
            self.parts.append(body)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send(self, req: bytes, stream: bool) -> tuple[float, float | None, int, bytes]:
        """Send one request; return (end time, first-body time, status, body or its tail)."""
        assert self.transport is not None
        self._reset(stream)
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(req)
        await self.waiter
        end = time.perf_counter()
        status = self.status
        if not self.keep:
            self.transport.close()
            self.lost = True
        return end, self.first, status, self.tail if stream else b"".join(self.parts)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, host, port)
    return proto


def _usage_ollama(obj: dict[str, Any]) -> tuple[int, int]:
    return int(obj.get("eval_count") or 0), int(obj.get("prompt_eval_count") or 0)


def _usage_openai(obj: dict[str, Any]) -> tuple[int, int] | None:
    u = obj.get("usage")
    if not u:
        return None
    return int(u.get("completion_tokens") or 0), int(u.get("prompt_tokens") or 0)


def parse(api: str, stream: bool, payload: bytes, nl: int) -> tuple[int, int, int, str | None]:
    """(output tokens, prompt tokens, chunks, error) from a body or a stream's tail."""
    try:
        if not stream:
            obj = _decode(payload)
            if "error" in obj and api == "ollama":
                return 0, 0, 0, str(obj["error"])
            if api == "ollama":
                out, prompt = _usage_ollama(obj)
            else:
                out, prompt = _usage_openai(obj) or (0, 0)
            return out, prompt, 1, None
        if api == "ollama":
            lines = [ln for ln in payload.split(b"\n") if ln.strip()]
            last = _decode(lines[-1]) if lines else {}
            if "error" in last:
                return 0, 0, nl, str(last["error"])
            out, prompt = _usage_ollama(last)
            return out, prompt, nl, None
        # SSE: events end with a blank line; the usage event comes just before [DONE]
        events = [e for e in payload.split(b"\n\n") if e.strip()]
        chunks = nl // 2
        for ev in reversed(events[-4:]):
            data = ev.strip()
            if not data.startswith(b"data:"):
                continue
            data = data[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                obj = _decode(data)
            except msgspec.DecodeError:
                continue
            if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                return 0, 0, chunks, str(obj["error"])
            u = _usage_openai(obj) if isinstance(obj, dict) else None
            if u:
                return u[0], u[1], chunks, None
        return 0, 0, chunks, "no usage in the stream (stream_options.include_usage ignored?)"
    except (msgspec.DecodeError, IndexError, AttributeError, TypeError) as e:
        return 0, 0, nl, f"undecodable body: {e}"


class Worker:
    """A closed-loop client: one connection, one request after the other."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conn: _Conn | None = None

    async def open(self) -> None:
        if self.conn is None or self.conn.lost:
            self.conn = await connect(*self.target.host_port)

    async def one(self, req: bytes, stream: bool) -> Result:
        t0 = time.perf_counter()
        try:
            await self.open()
            assert self.conn is not None
            start = time.perf_counter()
            end, first, status, payload = await self.conn.send(req, stream)
        except (OSError, ConnectionError) as e:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return Result(False, 0, time.perf_counter() - t0, None, error=str(e) or type(e).__name__)
        lat = end - start
        if status >= 400:
            return Result(False, status, lat, None, error=payload[:300].decode(errors="replace"))
        nl = self.conn.nl if stream else 0
        out, prompt, chunks, err = parse(self.target.api, stream, payload, nl)
        ttft = (first - start) if (stream and first is not None) else lat
        return Result(err is None, status, lat, ttft, out, prompt, chunks, err)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Batch:
    """Every request of one level against one target, and the wall time they took."""

    target: str
    concurrency: int
    stream: bool
    wall: float
    results: list[Result]


async def run_batch(target: Target, concurrency: int, *, requests: int | None = None, seconds: float | None = None,
                    max_tokens: int = 32, stream: bool = True, prompts: list[str] | None = None) -> Batch:
    """`concurrency` workers send `requests` requests in all (or keep going for `seconds`).

    Connections are opened before the clock starts; wall time ends with the last response.
    """
    prompts = prompts or PROMPTS
    reqs = [target.request(p, max_tokens, stream) for p in prompts]
    workers = [Worker(target) for _ in range(concurrency)]
    await asyncio.gather(*(w.open() for w in workers))
    results: list[Result] = []
    counter: Iterator[int]
    if seconds is None:
        counter = iter(range(requests if requests is not None else concurrency))
    else:
        counter = _count()
    deadline = None
    t0 = time.perf_counter()
    if seconds is not None:
        deadline = t0 + seconds

    async def loop(w: Worker) -> None:
        for i in counter:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            results.append(await w.one(reqs[i % len(reqs)], stream))

    try:
        await asyncio.gather(*(loop(w) for w in workers))
    finally:
        wall = time.perf_counter() - t0
        for w in workers:
            w.close()
    return Batch(target.name, concurrency, stream, wall, results)


def _count() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1
