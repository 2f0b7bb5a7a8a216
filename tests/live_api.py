"""The API as `vllama serve` builds it (serve.api_app: host check, CORS, keys, body limit,
in-flight cap in front of Litestar), in process through httpx's ASGI transport, over a
registry that is a file on disk, so that tests can save it and reload it as a server would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from router.auth import KeyStore
from router.config import load
from router.serve import ServingFleet, api_app
from router.service import OllamaService
from router.upstream import Upstream

KEY = "team-key-0123456789abcdef"
"""The one key of the keys file `registry_file` writes."""


def write(path: Path, server: dict[str, Any]) -> None:
    """Save the registry with this `server` section and one model at a URL nothing answers."""
    path.write_text(yaml.safe_dump({"server": server,
                                    "models": [{"name": "r", "source": "r", "url": "http://127.0.0.1:9/v1"}]}))


def registry_file(directory: Path) -> Path:
    """models.yaml in `directory` (no server settings) beside keys.yaml, which holds `KEY`."""
    (directory / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"name": "team", "key": KEY}]}))
    path = directory / "models.yaml"
    write(path, {})
    return path


@asynccontextmanager
async def served(path: Path, host: str = "localhost") -> AsyncIterator[tuple[ServingFleet, httpx.AsyncClient]]:
    """The fleet and a client of the API serving the registry at `path`, requests sent to `host`."""
    config = load(path)
    upstream = Upstream()
    fleet = ServingFleet(config, None, upstream)
    keys = KeyStore.from_config(config.server.auth, config.base_dir)
    app = api_app(config, fleet, OllamaService(fleet, upstream), keys, "127.0.0.1", [])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}") as client:
            yield fleet, client
    finally:
        await fleet.close()
        await upstream.aclose()
