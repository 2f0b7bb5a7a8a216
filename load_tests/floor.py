"""The floor: the least any Python relay pays per streamed token on this box.

Three relays as bare as they come, each in front of the fake vLLM, for the overhead bench's
open-streams run (`overhead --floor`), where every token arrives in a write of its own as
from vLLM. They show which part of the router's CPU per token any relay pays and which part
the router's own layers add:

- ``tcp``: a byte pipe (uvloop streams, one upstream connection per client connection, no
  HTTP parsing at all): one read and one write per token, and the loop's turn between them;
- ``asgi``: uvicorn (httptools, uvloop) running a bare ASGI function that forwards with
  aiohttp and sends each read on as a body message: the HTTP server and client the router
  runs on, and nothing else;
- ``litestar``: the same under Litestar, the response a ``Stream``: the router's framework.

None checks anything, maps errors, counts tokens or times out: they are measuring sticks,
not servers. ``python -m load_tests.floor KIND --port P --upstream http://127.0.0.1:Q``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from litestar import Litestar, Request, route
from litestar.response import Stream

#: Request headers a relay must not copy: aiohttp sets its own framing.
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


async def pipe(port: int, upstream_host: str, upstream_port: int) -> None:
    """``tcp``: every client connection spliced to an upstream connection of its own."""

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(upstream_host, upstream_port)
        await asyncio.gather(copy(client_r, up_w), copy(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


class _Forward:
    """One aiohttp session to the upstream, made inside the running loop on first use."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: Any = None

    async def open(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Any:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        keep = [(k, v) for k, v in headers if k.lower() not in _HOP]
        return await self.session.request(method, self.upstream + path, headers=keep, data=body)


def asgi_app(upstream: str) -> Any:
    """``asgi``: forward any request; each upstream read goes on as one body message."""
    forward = _Forward(upstream)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        resp = await forward.open(scope["method"], scope["path"], headers, body)
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(b"content-type", resp.headers.get("content-type", "").encode())]})
            async for data in resp.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            resp.release()

    return app


def litestar_app(upstream: str) -> Any:
    """``litestar``: one catch-all handler answering with a ``Stream`` of the upstream's reads."""
    forward = _Forward(upstream)

    @route("/{path:path}", http_method=["GET", "POST"])
    async def relay(request: Request[Any, Any, Any], path: str) -> Stream:
        resp = await forward.open(request.method, path, list(request.headers.items()), await request.body())

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for data in resp.content.iter_any():
                    yield data
            finally:
                resp.release()

        return Stream(chunks(), status_code=resp.status, media_type=resp.headers.get("content-type", ""))

    return Litestar([relay], debug=False, logging_config=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["tcp", "asgi", "litestar"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the fake vLLM's URL, http://HOST:PORT")
    a = ap.parse_args(argv)

    import uvloop

    if a.kind == "tcp":
        host, _, port = a.upstream.removeprefix("http://").rstrip("/").rpartition(":")
        uvloop.run(pipe(a.port, host, int(port)))
        return 0
    import uvicorn

    app = asgi_app(a.upstream) if a.kind == "asgi" else litestar_app(a.upstream)
    # As the router runs uvicorn (router/serve.py): httptools, uvloop, no access log.
    uvicorn.run(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
