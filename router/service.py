"""The Ollama API's behaviour, one method per endpoint, free of HTTP framework code.

A request's path: find the model and wait until it can serve (`lifecycle`),
translate the body (`translate`), call vLLM (`upstream`), translate each chunk
back. Methods return either one encoded body or an async iterator of NDJSON
bytes; the HTTP layer only wraps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from . import translate, wire
from .config import parse_duration
from .lifecycle import Fleet, Lease, ModelNotFound, ModelUnavailable, State
from .translate import Target, TranslationError
from .upstream import Upstream, UpstreamError

log = logging.getLogger("vllama.service")

_encode = msgspec.json.Encoder().encode


class ApiError(Exception):
    """An error answered as Ollama does: ``{"error": message}`` with `status`."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class Reply:
    """A whole JSON body, or a stream of NDJSON lines (already encoded)."""

    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    status: int = 200


def keep_alive_seconds(value: wire.KeepAlive) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _line(obj: Any) -> bytes:
    return _encode(obj) + b"\n"


def _error_line(message: str) -> bytes:
    return _encode({"error": message}) + b"\n"


class OllamaService:
    def __init__(self, fleet: Fleet, upstream: Upstream, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.clock = clock

    # --- helpers -----------------------------------------------------------------

    async def _lease(self, name: str, keep_alive: wire.KeepAlive) -> Lease:
        if not name:
            raise ApiError(400, "model is required")
        ka = keep_alive_seconds(keep_alive)
        try:
            return await self.fleet.acquire(name, ka)
        except ModelNotFound as e:
            raise ApiError(404, str(e)) from None
        except ModelUnavailable as e:
            raise ApiError(503, e.message, e.retry_after) from None

    def _target(self, lease: Lease) -> Target:
        m = lease.runtime.model
        return Target(name=m.served_name, max_model_len=m.max_model_len, thinking=m.reasoning_parser is not None)

    async def _load_only(self, name: str, keep_alive: wire.KeepAlive, make: Callable[[str], Any]) -> Reply:
        """Empty prompt / no messages: Ollama loads (or, with keep_alive 0, unloads) the model."""
        if not name:
            raise ApiError(400, "model is required")
        ka = keep_alive_seconds(keep_alive)
        if ka == 0:
            try:
                rt = self.fleet.get(name)
            except ModelNotFound as e:
                raise ApiError(404, str(e)) from None
            if not rt.always and rt.state != State.STOPPED:
                await self.fleet.stop_model(rt, "keep_alive 0")
            return Reply(body=_encode(make("unload")))
        lease = await self._lease(name, keep_alive)
        lease.release()
        return Reply(body=_encode(make("load")))

    # --- generate and chat ----------------------------------------------------------

    async def generate(self, req: wire.GenerateRequest) -> Reply:
        if not req.prompt and not req.images and not req.raw:
            now = translate.rfc3339()
            return await self._load_only(req.model, req.keep_alive, lambda reason: wire.GenerateChunk(
                model=req.model, created_at=now, response="", done=True, done_reason=reason))
        start = self.clock()
        lease = await self._lease(req.model, req.keep_alive)
        try:
            call = translate.generate_request(req, self._target(lease))
        except TranslationError as e:
            lease.release()
            raise ApiError(e.status, str(e)) from None
        state = translate.GenerateStream(req.model, translate.Timing(start=start))
        return await self._run(lease, call, state)

    async def chat(self, req: wire.ChatRequest) -> Reply:
        if not req.messages:
            now = translate.rfc3339()
            return await self._load_only(req.model, req.keep_alive, lambda reason: wire.ChatChunk(
                model=req.model, created_at=now, message=wire.OutMessage(role="assistant", content=""),
                done=True, done_reason=reason))
        start = self.clock()
        lease = await self._lease(req.model, req.keep_alive)
        try:
            call = translate.chat_request(req, self._target(lease))
        except TranslationError as e:
            lease.release()
            raise ApiError(e.status, str(e)) from None
        state = translate.ChatStream(req.model, translate.Timing(start=start))
        return await self._run(lease, call, state)

    async def _run(self, lease: Lease, call: translate.UpstreamCall, state: Any) -> Reply:
        base = lease.runtime.base_url
        state.timing.upstream = self.clock()
        if not call.body["stream"]:
            try:
                body = await self.upstream.post_json(base, call.path, call.body)
            except UpstreamError as e:
                raise ApiError(e.status if e.status < 500 else 502, e.message) from None
            finally:
                lease.release()
            now = self.clock()
            state.timing.first_token = state.timing.first_token or state.timing.upstream
            state.timing.last_token = now
            return Reply(body=_encode(state.whole(body, now)))
        events = self.upstream.events(base, call.path, call.body)
        # Pull the first batch now so an upstream error before any output keeps its
        # status code instead of arriving as a 200 stream with an error line.
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = []
        except UpstreamError as e:
            lease.release()
            raise ApiError(e.status if e.status < 500 else 502, e.message) from None
        except BaseException:
            lease.release()
            raise
        return Reply(stream=self._relay(lease, events, first, state))

    async def _relay(self, lease: Lease, events: AsyncIterator[list[dict[str, Any]]],
                     first: list[dict[str, Any]], state: Any) -> AsyncIterator[bytes]:
        clock = self.clock
        try:
            batch: list[dict[str, Any]] | None = first
            while batch is not None:
                now = clock()
                out = b""
                for data in batch:
                    chunk = state.chunk(data, now)
                    if chunk is not None:
                        out += _line(chunk)
                if out:
                    yield out
                try:
                    batch = await anext(events)
                except StopAsyncIteration:
                    batch = None
            yield _line(state.done(clock()))
        except UpstreamError as e:
            log.warning("%s: stream ended by upstream error: %s", lease.runtime.name, e.message)
            yield _error_line(e.message)
        finally:
            lease.release()
            await events.aclose()
