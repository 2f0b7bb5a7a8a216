"""HTTP to the vLLM servers: one pooled httpx client, SSE decoding, raw relay.

This is the router's only network hop. It stays thin on purpose: bytes are
read as they arrive and every server-sent event already received is decoded
in one go, so a fast upstream costs one loop iteration per socket read rather
than per token, and a slow one still gets each token out the moment it lands.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from .translate import upstream_error_message

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class UpstreamError(Exception):
    """vLLM answered with an error, or could not be reached / stopped mid-way."""

    def __init__(self, status: int, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.unreachable = unreachable
        """Nothing reached vLLM (connection refused): safe to retry once it is back."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    first_token: float = 600.0
    between_tokens: float = 120.0


def _transport_error(exc: Exception, url: str) -> UpstreamError:
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(502, f"cannot connect to the model server at {url}", unreachable=True)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return UpstreamError(504, f"the model server at {url} timed out")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return UpstreamError(502, "the model server closed the connection (it may have crashed or restarted)")
    return UpstreamError(502, f"model server error: {exc}")


#: Pools per Upstream. httpcore walks every connection of a pool on each request,
#: so one pool with hundreds of streams costs milliseconds per request; several
#: small pools, taken in turn, keep that walk short (measured: load_tests/README.md).
POOLS = 16
#: vLLM's uvicorn closes idle connections after 5 s: drop ours first, or a request
#: may be written to a connection the server is closing.
KEEPALIVE_EXPIRY = 4.0


class _Stall:
    """Cancels the running task if, once armed, it waits on the upstream for `seconds` (a stall).

    Cheaper than an ``asyncio.timeout`` per chunk: arming only stamps the time; the timer is
    re-armed once per period. `fired` tells (and absorbs) a cancellation that came from here.
    """

    __slots__ = ("seconds", "loop", "task", "last", "handle", "expired", "waiting")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.last = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.expired = False
        self.waiting = False

    def arm(self) -> None:
        """Waiting on the upstream from now."""
        self.last = self.loop.time()
        self.waiting = True
        if self.handle is None:
            self.handle = self.loop.call_at(self.last + self.seconds, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if not self.waiting or now - self.last < self.seconds:
            self.handle = self.loop.call_at((self.last if self.waiting else now) + self.seconds, self._check)
            return
        self.handle = None
        self.expired = True
        if self.task is not None:
            self.task.cancel()

    def fired(self) -> bool:
        if self.expired and self.task is not None:
            self.task.uncancel()
            return True
        return False

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Upstream:
    """The router's HTTP client to every vLLM server: keep-alive connections in a few pools."""

    def __init__(self, timeouts: Timeouts | None = None, pools: int = POOLS) -> None:
        self.timeouts = timeouts or Timeouts()
        t = self.timeouts
        self._clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(connect=t.connect, read=t.first_token, write=t.first_token, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                    keepalive_expiry=KEEPALIVE_EXPIRY),
                trust_env=False,
            )
            for _ in range(pools)
        ]
        self._next = itertools.cycle(self._clients).__next__

    @property
    def client(self) -> httpx.AsyncClient:
        """A client for one call (pools are taken in turn)."""
        return self._next()

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request, *, stream: bool) -> httpx.Response:
        """Send once more if a kept-alive connection turns out closed before any answer:
        the server never saw the request, so it is safe to repeat."""
        try:
            return await client.send(request, stream=stream)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await client.send(request, stream=stream)

    async def post_json(self, base_url: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A non-streamed call; raises UpstreamError with vLLM's own message on failure."""
        url = base_url + path
        client = self.client
        req = client.build_request("POST", url, content=_encode(body), headers={"content-type": "application/json"})
        try:
            resp = await self._send(client, req, stream=False)
        except httpx.HTTPError as e:
            raise _transport_error(e, base_url) from None
        if resp.status_code >= 400:
            raise UpstreamError(resp.status_code, upstream_error_message(resp.status_code, resp.content))
        return _decode(resp.content)

    async def get(self, base_url: str, path: str, timeout: float | None = None) -> httpx.Response:
        return await self.client.get(base_url + path, timeout=timeout or self.timeouts.connect)

    async def events(self, base_url: str, path: str, body: Mapping[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """POST a streaming call and yield, per socket read, the SSE `data` objects it completed.

        Ends at ``[DONE]``. An error before the stream starts raises UpstreamError
        with vLLM's status; one after it raises UpstreamError(502/504) so the caller
        can end its own stream with an error line. Leaving the loop early closes the
        connection, which makes vLLM abort the request.
        """
        url = base_url + path
        client = self.client
        req = client.build_request("POST", url, content=_encode(body),
                                   headers={"content-type": "application/json", "accept": "text/event-stream"})
        try:
            resp = await self._send(client, req, stream=True)
        except httpx.HTTPError as e:
            raise _transport_error(e, base_url) from None
        try:
            if resp.status_code >= 400:
                content = await resp.aread()
                raise UpstreamError(resp.status_code, upstream_error_message(resp.status_code, content))
            buf = b""
            raw = resp.aiter_raw()
            first = True
            while True:
                try:
                    if first:
                        data = await anext(raw)
                        first = False
                    else:
                        async with asyncio.timeout(self.timeouts.between_tokens):
                            data = await anext(raw)
                except StopAsyncIteration:
                    break
                buf += data
                if b"\n\n" not in buf:
                    continue
                *events, buf = buf.split(b"\n\n")
                batch = []
                for ev in events:
                    for line in ev.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            if batch:
                                yield batch
                            # Read the body to its end so the connection goes back to the pool.
                            async for _ in raw:
                                pass
                            return
                        obj = _decode(payload)
                        if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                            err = obj["error"]
                            msg = err.get("message") if isinstance(err, dict) else str(err)
                            code = err.get("code", 500) if isinstance(err, dict) else 500
                            if batch:
                                yield batch
                            raise UpstreamError(code if isinstance(code, int) else 500, msg or "model server error")
                        batch.append(obj)
                if batch:
                    yield batch
            raise UpstreamError(502, "the model server ended the stream early (it may have crashed or restarted)")
        except (httpx.HTTPError, TimeoutError) as e:
            raise _transport_error(e, base_url) from None
        finally:
            await resp.aclose()

    async def relay(
        self, base_url: str, path: str, body: bytes, headers: Mapping[str, str], method: str = "POST"
    ) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """Send a request as is and hand back status, headers and the body as it arrives.

        Used by the OpenAI/Anthropic pass-through: bytes go through unchanged.
        """
        url = base_url + path
        client = self.client
        req = client.build_request(method, url, content=body, headers=headers)
        try:
            resp = await self._send(client, req, stream=True)
        except httpx.HTTPError as e:
            raise _transport_error(e, base_url) from None

        async def body_iter() -> AsyncIterator[bytes]:
            # The first read waits up to first_token (httpx's read timeout); later ones up to
            # between_tokens, watched by one timer re-armed per period rather than per chunk.
            watch = _Stall(self.timeouts.between_tokens)
            try:
                async for chunk in resp.aiter_raw():
                    watch.waiting = False  # the client's time to read is not the model's
                    yield chunk
                    watch.arm()
            except (httpx.HTTPError, TimeoutError, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not watch.fired():
                    raise
                # Mid-stream failure: the client sees a cut SSE stream, as with vLLM itself,
                # ended by an error event saying why.
                if "event-stream" in resp.headers.get("content-type", ""):
                    err = _transport_error(TimeoutError() if watch.expired else e, base_url)
                    yield b"data: " + _encode({"error": {"message": err.message, "type": "APIError",
                                                         "param": None, "code": err.status}}) + b"\n\n"
                return
            finally:
                watch.cancel()
                await resp.aclose()

        keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "cache-control")}
        return resp.status_code, keep, body_iter()
