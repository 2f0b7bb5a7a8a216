"""The router's HTTP client against real sockets: how each way a model server can fail reads.

The router acts on the kind of failure (a refused connection waits for the restart, a
kept-alive connection the server closed is retried once, a stall is a 504), and aiohttp's
errors reach it through httpx-aiohttp, which maps them loosely: these pin the mapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from router.upstream import Timeouts, Upstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n"
      b"\r\n{\"ok\": true}")


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def start_sse(writer: asyncio.StreamWriter, event: bytes) -> None:
    """Answer 200 with a chunked event stream and send its first event."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
    await writer.drain()


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream(Timeouts(connect=1.0, first_token=1.0, between_tokens=0.5))
    yield up
    await up.aclose()


async def test_refused_connection_is_unreachable(upstream: Upstream) -> None:
    server, url = await serve(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError) as e:
        await upstream.post_json(url, "/v1/completions", {})
    assert (e.value.status, e.value.unreachable) == (502, True)
    assert e.value.message == f"cannot connect to the model server at {url}"


async def test_server_that_hangs_up_before_answering_is_a_closed_connection_not_a_timeout(upstream: Upstream) -> None:
    seen = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        await read_request(reader)
        seen += 1
        writer.close()

    server, url = await serve(hang_up)
    async with server:
        with pytest.raises(UpstreamError) as e:
            await upstream.post_json(url, "/v1/completions", {})
    assert (e.value.status, e.value.unreachable) == (502, False)
    assert "closed the connection" in e.value.message
    assert seen == 2  # sent once more: a kept-alive connection may have been closed under us


async def test_a_kept_alive_connection_the_server_closed_is_retried(upstream: Upstream) -> None:
    conns = 0

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        await read_request(reader)
        writer.write(OK)  # keep-alive by HTTP/1.1 default, then closed without a word
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server, url = await serve(one_per_connection)
    async with server:
        assert await upstream.post_json(url, "/x", {}) == {"ok": True}
        await asyncio.sleep(0.2)  # the server has closed the idle connection by now
        assert await upstream.post_json(url, "/x", {}) == {"ok": True}
    assert conns == 2


async def test_no_answer_before_first_token_timeout_is_a_504(upstream: Upstream) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    server, url = await serve(stall)
    async with server:
        with pytest.raises(UpstreamError) as e:
            await upstream.post_json(url, "/v1/completions", {})
    assert e.value.status == 504 and e.value.message == f"the model server at {url} timed out"


async def test_new_timeouts_hold_from_the_next_request() -> None:
    """A reload of server.*_timeout: the next request waits as long as the new values say."""
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await start_sse(writer, b'data: {"choices": []}\n\n')
        await asyncio.sleep(30)

    up = Upstream(Timeouts(connect=30, first_token=30, between_tokens=30))
    server, url = await serve(stall)
    try:
        async with server:
            up.set_timeouts(Timeouts(connect=1.0, first_token=0.3, between_tokens=0.3))
            with pytest.raises(UpstreamError) as e:
                await asyncio.wait_for(up.post_json(url, "/v1/completions", {}), 5)
            assert e.value.status == 504  # first_token
            events = up.events(url, "/v1/completions", {"stream": True})
            assert await anext(events) == [{"choices": []}]
            with pytest.raises(UpstreamError) as e:
                await asyncio.wait_for(anext(events), 5)
            assert e.value.status == 504  # between_tokens
    finally:
        await up.aclose()


async def test_stream_cut_mid_way_is_a_closed_connection(upstream: Upstream) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await start_sse(writer, b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n')
        await asyncio.sleep(0.05)
        writer.transport.abort()

    server, url = await serve(cut)
    got = []
    async with server:
        with pytest.raises(UpstreamError) as e:
            async for batch in upstream.events(url, "/v1/completions", {"stream": True}):
                got += batch
    assert got == [{"choices": [{"index": 0, "text": "a"}]}]  # what came before the cut is delivered
    assert e.value.status == 502 and "closed the connection" in e.value.message


async def test_stall_between_tokens_is_a_504(upstream: Upstream) -> None:
    async def stall_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await start_sse(writer, b'data: {"choices": []}\n\n')
        await asyncio.sleep(5)

    server, url = await serve(stall_mid_stream)
    async with server:
        with pytest.raises(UpstreamError) as e:
            async for _ in upstream.events(url, "/v1/completions", {"stream": True}):
                pass
    assert e.value.status == 504


async def test_requests_carry_no_compression_and_the_relay_passes_bytes_unchanged(upstream: Upstream) -> None:
    heads: list[bytes] = []

    async def echo_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request(reader))
        body = b"data: raw bytes\n\ndata: [DONE]\n\n"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()

    server, url = await serve(echo_head)
    async with server:
        status, headers, chunks = await upstream.relay(url, "/v1/chat/completions", b"{}",
                                                       {"content-type": "application/json"})
        data = b"".join([c async for c in chunks])
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert data == b"data: raw bytes\n\ndata: [DONE]\n\n"
    assert b"accept-encoding: identity" in heads[0].lower()
