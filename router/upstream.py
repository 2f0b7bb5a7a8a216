"""HTTP to the vLLM servers: one pooled httpx client, SSE decoding, raw relay.

This is the router's only network hop. It stays thin on purpose: bytes are
read as they arrive and every server-sent event already received is decoded
in one go, so a fast upstream costs one loop iteration per socket read rather
than per token, and a slow one still gets each token out the moment it lands.

The client is httpx over aiohttp's connection pool and C HTTP parser (the
httpx-aiohttp transport, as the OpenAI SDK offers): httpcore's pool walks every
connection at each request's start and end, and its pure-Python parser reads a
stream in small pieces; with it the router spent 3-4x more CPU per request
(measured: load_tests/README.md). Calls to vLLM go through that transport
directly (httpx's transport API: httpx requests and responses, httpx errors);
the client above it serves the health checks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
import httpx
import msgspec
import psutil
from httpx_aiohttp import AiohttpTransport

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

    def as_httpx(self) -> httpx.Timeout:
        """As httpx's: connect, and first_token for the first read (`events` and `relay` watch
        the later ones); no pool wait (the pool is unbounded)."""
        return httpx.Timeout(connect=self.connect, read=self.first_token, write=self.first_token, pool=None)


def _transport_error(exc: Exception, url: str) -> UpstreamError:
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(502, f"cannot connect to the model server at {url}", unreachable=True)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return UpstreamError(504, f"the model server at {url} timed out")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return UpstreamError(502, "the model server closed the connection (it may have crashed or restarted)")
    return UpstreamError(502, f"model server error: {exc}")


#: vLLM's uvicorn closes idle connections after 5 s: drop ours first, or a request
#: may be written to a connection the server is closing.
KEEPALIVE_EXPIRY = 4.0

_AIOHTTP_ERRORS = (aiohttp.ClientError, httpx.TransportError, asyncio.TimeoutError)


def as_httpx_error(exc: BaseException) -> BaseException:
    """aiohttp's error (or httpx-aiohttp's mapping of it) as the httpx error it means.

    httpx-aiohttp maps every `ClientConnectionError` to ``ConnectTimeout``, so a refused
    connection or a server that hung up would read as a timeout; the router tells them
    apart (refused: wait for the restart; hung up: retry once; timed out: 504).
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None else exc
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(cause))
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(cause))
    if isinstance(cause, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(str(cause) or "timed out")
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(str(cause))
    if isinstance(cause, aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return httpx.ReadError(str(cause))
    if isinstance(cause, aiohttp.ClientError):
        return httpx.TransportError(str(cause))
    return exc


def _reraise(exc: BaseException) -> NoReturn:
    err = as_httpx_error(exc)
    if err is exc:
        raise exc
    raise err from exc


class _Body(httpx.AsyncByteStream):
    """A response body whose errors are httpx's (see `as_httpx_error`)."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                yield chunk
        except _AIOHTTP_ERRORS as e:
            _reraise(e)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Transport(AiohttpTransport):
    """httpx-aiohttp's transport on an unbounded keep-alive pool, raising httpx's own errors."""

    def __init__(self) -> None:
        super().__init__(trust_env=False, client=self._session)

    @staticmethod
    def _session() -> aiohttp.ClientSession:
        # Made on first use, inside the running loop. limit=0: vLLM queues requests, not us.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_EXPIRY),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            # No overall cap (aiohttp's default is 5 minutes): every request carries httpx's
            # connect and read timeouts, and streams the router's between-token watch.
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except _AIOHTTP_ERRORS as e:
            _reraise(e)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream)
        return response


class _Stall:
    """Cancels the running task if, once armed, it waits on the upstream for `seconds` (a stall).

    Cheaper than an ``asyncio.timeout`` per chunk: arming only stamps the time; the timer is
    re-armed once per period. `fired` tells (and absorbs) a cancellation that came from here.
    """

    __slots__ = ("expired", "handle", "last", "loop", "seconds", "task", "waiting")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.last = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.expired = False
        self.waiting = False

    def arm(self) -> None:
        """The current task waits on the upstream from now."""
        self.task = asyncio.current_task()  # a stream may be read by another task than began it
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


class _NoCookies(httpx.Cookies):
    """vLLM sets no cookies, and the router must not carry one client's to another's
    request; httpx would still parse every response for them (a urllib Request each)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class _Client(httpx.AsyncClient):
    """httpx's client without a cookie jar."""

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        pass


_NO_COOKIES = _NoCookies()


#: Parsed once per URL: httpx validates a URL string character by character.
_url = functools.lru_cache(maxsize=1024)(httpx.URL)

#: vLLM never compresses; asking for identity also keeps aiohttp from offering gzip.
_IDENTITY = ("accept-encoding", "identity")
_JSON_HEADERS = httpx.Headers([("content-type", "application/json"), _IDENTITY])
_SSE_HEADERS = httpx.Headers([("content-type", "application/json"), ("accept", "text/event-stream"), _IDENTITY])


class Upstream:
    """The router's HTTP client to every vLLM server: keep-alive connections, one pool."""

    def __init__(self, timeouts: Timeouts | None = None) -> None:
        self.transport = Transport()
        self.client = _Client(
            transport=self.transport,
            headers=[_IDENTITY],  # for the health checks; the calls below set their own headers
            trust_env=False,
        )
        self.set_timeouts(timeouts or Timeouts())

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Use `timeouts` from the next request on (a reload of models.yaml can change them).

        Each request takes its timeouts when it starts: one in flight keeps those it began with.
        """
        self.timeouts = timeouts
        self.client.timeout = timeouts.as_httpx()
        self._timeout = self.client.timeout.as_dict()

    async def aclose(self) -> None:
        await self.client.aclose()

    def _request(self, method: str, url: str, content: bytes, headers: httpx.Headers) -> httpx.Request:
        """The request, built directly rather than by ``client.build_request``: that one parses
        the URL string and merges the client's default headers and cookies on every call, a
        quarter of the upstream hop's CPU (75 µs of ~320 per request, measured)."""
        return httpx.Request(method, _url(url), content=content, headers=headers,
                             extensions={"timeout": self._timeout})

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        """Send once more if a kept-alive connection turns out closed before any answer:
        the server never saw the request, so it is safe to repeat."""
        try:
            return await self._send_once(request, stream=stream)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await self._send_once(request, stream=stream)

    async def _send_once(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        """Through httpx's transport API, below the client: the client's layers (auth flow,
        redirects, event hooks, cookies, timing) do nothing for these calls, and skipping
        them cut the router's CPU per whole request by 7% (725 → 677 µs, measured)."""
        response = await self.transport.handle_async_request(request)
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

    async def post_json(self, base_url: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A non-streamed call; raises UpstreamError with vLLM's own message on failure."""
        url = base_url + path
        req = self._request("POST", url, _encode(body), _JSON_HEADERS)
        try:
            resp = await self._send(req, stream=False)
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
        req = self._request("POST", url, _encode(body), _SSE_HEADERS)
        try:
            resp = await self._send(req, stream=True)
        except httpx.HTTPError as e:
            raise _transport_error(e, base_url) from None
        # The first read waits up to first_token (httpx's read timeout); later ones up to
        # between_tokens, and only while waiting on vLLM (not on our reader).
        watch = _Stall(self.timeouts.between_tokens)
        try:
            if resp.status_code >= 400:
                content = await resp.aread()
                raise UpstreamError(resp.status_code, upstream_error_message(resp.status_code, content))
            buf = b""
            raw = resp.aiter_raw()
            first = True
            while True:
                if not first:
                    watch.arm()
                first = False
                try:
                    data = await anext(raw)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if not watch.fired():
                        raise
                    raise TimeoutError from None
                watch.waiting = False
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
            watch.cancel()
            await resp.aclose()

    async def relay(
        self, base_url: str, path: str, body: bytes, headers: Mapping[str, str], method: str = "POST"
    ) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """Send a request as is and hand back status, headers and the body as it arrives.

        Used by the OpenAI/Anthropic pass-through: bytes go through unchanged. A failure
        before the answer raises UpstreamError; one mid-body ends the body with
        UpstreamError(502/504) once what came before it is out, for the caller to say so
        in its API's words.
        """
        url = base_url + path
        req = self._request(method, url, body, httpx.Headers({**headers, "accept-encoding": "identity"}))
        try:
            resp = await self._send(req, stream=True)
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
                raise _transport_error(TimeoutError() if watch.expired else e, base_url) from None
            finally:
                watch.cancel()
                await resp.aclose()

        keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "cache-control")}
        return resp.status_code, keep, body_iter()


_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def sever_connections(port: int) -> int:
    """Shut down this process's TCP connections to a vLLM server on 127.0.0.1:`port`;
    how many. For a stop (`lifecycle.Fleet`): whatever request is on them, streamed or
    not, waiting for its head or its next token, ends with a closed connection at once.

    Through the socket itself (a duplicate of its descriptor, found by psutil), not the
    HTTP client: whichever request reads from it gets a closed connection, and the server
    sees the client leave. The peer is checked again on the duplicate, in case the
    descriptor was closed and reused meanwhile.
    """
    cut = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.fd < 0 or not conn.raddr or conn.raddr.port != port or conn.raddr.ip not in _LOOPBACK:
            continue
        try:
            sock = socket.socket(fileno=os.dup(conn.fd))
        except OSError:
            continue
        try:
            if sock.getpeername()[1] == port:
                sock.shutdown(socket.SHUT_RDWR)
                cut += 1
        except OSError:
            pass
        finally:
            sock.close()
    return cut
