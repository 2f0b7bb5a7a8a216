"""The router as `vllama serve` builds it (keys, in-flight cap, guarded HTTP protocol), on a thread.

Like fake_vllm.RouterThread, with the options serve.py passes: tests of auth,
limits, bad input and fuzzing talk real HTTP to it, with a FakeVLLM behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

try:
    from .fake_vllm import RouterThread
except ImportError:
    from fake_vllm import RouterThread


class ServedRouter(RouterThread):
    def __init__(self, registry: dict[str, Any], *, keys: Any = None, max_inflight: int | None = None,
                 max_body_bytes: int = 64 << 20, timeouts: Any = None, admin: bool = False,
                 **protocol: float) -> None:
        super().__init__(registry)
        self.keys = keys
        self.max_inflight = max_inflight
        self.max_body_bytes = max_body_bytes
        self.timeouts = timeouts
        self.protocol = protocol
        self.admin = admin
        """Mount the admin routes (/vllama, /api/pull, /api/delete) as serve does."""
        self.app: Any = None

    async def _main(self) -> None:
        from router.app import create_app
        from router.catalog import Catalog
        from router.config import parse
        from router.lifecycle import Fleet
        from router.limits import guarded_http
        from router.service import OllamaService
        from router.upstream import Upstream

        self._loop = asyncio.get_running_loop()
        config = parse(self.registry)
        upstream = Upstream(self.timeouts)
        self.fleet = Fleet(config, None, upstream)
        self.service = OllamaService(self.fleet, upstream)
        extra: list[Any] = []
        if self.admin:
            from router.admin import admin_router, library_routes

            extra = [admin_router(self.fleet), *library_routes(self.fleet)]
        self.app = create_app(self.service, Catalog(config), extra_routes=extra, max_body_bytes=self.max_body_bytes,
                              auth=self.keys, max_inflight=self.max_inflight)
        await self.fleet.start()
        await self.fleet.refresh()
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", access_log=False,
            loop="uvloop", http=guarded_http(**self.protocol), timeout_keep_alive=2))
        try:
            await self._server.serve()
        finally:
            await self.fleet.close()
            await upstream.aclose()
