"""The Ollama API's behaviour, one method per endpoint, free of HTTP framework code.

A request's path: find the model and wait until it can serve (`lifecycle`),
translate the body (`translate`), call vLLM (`upstream`), translate each chunk
back. Methods return either one encoded body or an async iterator of NDJSON
bytes; the HTTP layer only wraps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from . import engine, translate, wire
from .catalog import context_length
from .config import Model, normalize_name, parse_duration
from .lifecycle import Fleet, Lease, ModelNotFound, ModelUnavailable, State
from .translate import StreamAborted, Target, TranslationError
from .upstream import Upstream, UpstreamError

log = logging.getLogger("vllama.service")

_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


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
    if isinstance(value, str) and (not value or value != value.strip()):
        # Ollama reads a string with Go's time.ParseDuration, which refuses "" and spaces
        # (config.parse_duration, for models.yaml, takes "" as 0: here that would unload).
        raise ApiError(400, f'time: invalid duration "{value}"')
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _line(obj: Any) -> bytes:
    return _encode(obj) + b"\n"


def _error_line(message: str) -> bytes:
    return _encode({"error": message}) + b"\n"


def not_found_message(endpoint: str, name: str) -> str:
    """Ollama's 404 for an unknown model, worded per endpoint as its server words it
    (clients match on "not found" and the status)."""
    if endpoint in ("embed", "embeddings"):
        return f'model "{name}" not found, try pulling it first'
    return f"model '{name}' not found"


def _not_found(endpoint: str, name: str, error: ModelNotFound) -> ApiError:
    """The fleet's ModelNotFound in the endpoint's words, keeping the fleet's detail
    (why a known model has no files) that follows its fixed wording."""
    detail = str(error).partition(", try pulling it first")[2]
    return ApiError(404, not_found_message(endpoint, name) + detail)


def shown_name(name: str, model: Model) -> str:
    """The model's name in a response: as the client sent it when that is the model's name or
    one of its aliases (Ollama echoes it), else the registry's own (a name that matched only
    as Ollama compares names: another case, a qualified ``library/`` name)."""
    own = {normalize_name(n) for n in (model.name, *model.aliases)}
    return name if normalize_name(name) in own else model.name


def _upstream_status(e: UpstreamError) -> int:
    """vLLM's 4xx are the client's to fix and keep their status; a timeout is a 504; anything else
    is a bad gateway."""
    return e.status if 400 <= e.status < 500 or e.status == 504 else 502


def _refusal(lease: Lease, e: UpstreamError) -> ApiError:
    """A failed call to vLLM as the Ollama API answers it: the status `_upstream_status` gives,
    and vLLM's message (one readable line for its request-validation dump) unless the router
    stopped the model under the request (`Lease.explain`). The /v1 routes pass vLLM's own body
    on instead."""
    message = translate.readable_error(e.message) if e.status == 400 else e.message
    return ApiError(_upstream_status(e), lease.explain(message, e.status))


class OllamaService:
    def __init__(self, fleet: Fleet, upstream: Upstream, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.clock = clock
        self._ctx: dict[tuple[str, str, int | None], int | None] = {}
        self._num_ctx_warned: set[tuple[str, int]] = set()

    # --- helpers -----------------------------------------------------------------

    async def _lease(self, name: str, keep_alive: wire.KeepAlive, endpoint: str = "") -> Lease:
        if not name:
            raise ApiError(400, "model is required")
        ka = keep_alive_seconds(keep_alive)
        try:
            return await self.fleet.acquire(name, ka, endpoint)
        except ModelNotFound as e:
            raise _not_found(endpoint, name, e) from None
        except ModelUnavailable as e:
            raise ApiError(503, e.message, e.retry_after) from None

    def _model(self, name: str, endpoint: str) -> Model:
        """The registry's entry for `name`, what a request is checked against before anything
        waits for the model."""
        if not name:
            raise ApiError(400, "model is required")
        model = self.fleet.config.lookup(name)
        if model is None:
            self._count("unknown", endpoint, 404)
            raise ApiError(404, not_found_message(endpoint, name))
        return model

    def _count(self, model: str, endpoint: str, status: int) -> None:
        """A request refused before it held the model, counted in the metrics as the fleet
        counts those it refuses."""
        metrics = getattr(self.fleet, "metrics", None)
        if metrics is not None:
            metrics.started(model, endpoint).finished(status)

    async def _prepare(self, name: str, keep_alive: wire.KeepAlive, endpoint: str,
                       make: Callable[[Target], T]) -> tuple[Lease, Target, T]:
        """The request built by `make` (a pure translation) for the registry's entry, then the
        model waited for. Everything the registry knows (embedding or not, thinking, tools,
        options, images, the context) is checked before the wait, so a bad request is
        refused at once and never cold-starts a model. Built again after the wait only if
        the model's target changed meanwhile (a reload, or a context length read from files
        the start downloaded)."""
        model = self._model(name, endpoint)
        target = self.target(model, shown_name(name, model))
        try:
            built = make(target)
        except TranslationError as e:
            self._count(model.name, endpoint, e.status)
            raise ApiError(e.status, str(e)) from None
        lease = await self._lease(name, keep_alive, endpoint)
        served = self.target(lease.runtime.model, target.label)
        if served != target:
            built = self._translate(lease, lambda: make(served))
        return lease, served, built

    def _context_length(self, m: Model) -> int | None:
        """The context the model is served with: max_model_len, else what vLLM reads from config.json
        (not remembered while unknown: the files may come with the model's first start)."""
        if m.max_model_len:
            return m.max_model_len
        key = (m.name, m.source, m.max_model_len)
        if self._ctx.get(key) is None:
            self._ctx[key] = context_length(self.fleet.config, m)
        return self._ctx[key]

    def target(self, model: Model, label: str = "") -> Target:
        # A model at an operator's `url` runs a vLLM vLLama did not start: its limit is unknown.
        max_stop = None if model.url else engine.max_stop_strings(self.fleet.config, model)
        return Target(name=model.served_name, max_model_len=self._context_length(model),
                      thinking=model.reasoning_parser is not None, tools=model.tool_call_parser is not None,
                      embedding=model.embedding, label=label or model.name, max_stop=max_stop)

    def _translate(self, lease: Lease, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except TranslationError as e:
            lease.status = e.status
            lease.release()
            raise ApiError(e.status, str(e)) from None

    def _note_num_ctx(self, options: wire.Options | None, target: Target) -> None:
        """A num_ctx above the served context is clamped to it (it never reaches vLLM), as
        Ollama clamps it. Logged as a warning once per model and value, then at debug: a client
        sends the same num_ctx with every request (Open WebUI's model settings), and a warning
        per request would bury the log, while the first one already says what to change."""
        ctx = translate.oversized_num_ctx(options, target)
        if ctx is None:
            return
        key = (target.name, ctx)
        if key in self._num_ctx_warned:
            log.debug("%s: num_ctx %d clamped to %s", target.shown, ctx, target.max_model_len)
            return
        if len(self._num_ctx_warned) >= 1024:  # values come from clients: keep the set bounded
            self._num_ctx_warned.clear()
        self._num_ctx_warned.add(key)
        log.warning("%s: num_ctx %d is more than the %s tokens the model is served with; using %s "
                    "(raise max_model_len in models.yaml for more)", target.shown, ctx, target.max_model_len,
                    target.max_model_len)

    def _unreachable(self, lease: Lease, e: UpstreamError) -> None:
        """A connection refused: have the fleet look at the model now, not at its next tick."""
        suspect = getattr(self.fleet, "suspect", None)
        if getattr(e, "unreachable", False) and suspect is not None:
            spawn = getattr(self.fleet, "_spawn", None)
            if spawn is not None:
                spawn(suspect(lease.runtime))

    async def _load_only(self, name: str, keep_alive: wire.KeepAlive, make: Callable[[str], Any]) -> Reply:
        """Empty prompt / no messages: Ollama loads (or, with keep_alive 0, unloads) the model."""
        if not name:
            raise ApiError(400, "model is required")
        ka = keep_alive_seconds(keep_alive)
        if ka == 0:
            try:
                rt = self.fleet.get(name)
            except ModelNotFound as e:
                raise _not_found("load", name, e) from None
            if not rt.always and rt.state != State.STOPPED:
                if rt.inflight:
                    rt.keep_alive = 0.0  # as in Ollama: unloaded when the requests in flight are done
                else:
                    await self.fleet.stop_model(rt, "keep_alive 0")
            return Reply(body=_encode(make("unload")))
        lease = await self._lease(name, keep_alive, "load")
        lease.release()
        return Reply(body=_encode(make("load")))

    # --- generate and chat ----------------------------------------------------------

    async def generate(self, req: wire.GenerateRequest) -> Reply:
        if not req.prompt:
            now = translate.rfc3339()
            return await self._load_only(req.model, req.keep_alive, lambda reason: wire.GenerateChunk(
                model=req.model, created_at=now, response="", done=True, done_reason=reason))
        start = self.clock()
        continuing = bool(req.context) and not req.raw

        def build(target: Target) -> tuple[translate.UpstreamCall, translate.UpstreamCall | None]:
            """The call (its prompt left empty when it continues ``context``) and the /tokenize
            call for the new turn of a continuation."""
            call = translate.generate_request(req, target, [] if continuing else None)
            return call, translate.tokenize_request(req, target) if continuing else None

        lease, target, (call, tok) = await self._prepare(req.model, req.keep_alive, "generate", build)
        if tok is not None:
            call = translate.with_prompt(call, await self._continuation(lease, tok, req.context or []))
        self._note_num_ctx(req.options, target)
        state = translate.GenerateStream(target.label, translate.Timing(start=start), want_context=not req.raw,
                                         top_logprobs=req.top_logprobs or 0)
        return await self._run(lease, call, state)

    async def _continuation(self, lease: Lease, tok: translate.UpstreamCall, context: list[int]) -> list[int]:
        """``context`` + the new turn, templated by vLLM (`tok`), as one token-id prompt."""
        try:
            body = await self.upstream.post_json(lease.runtime.base_url, tok.path, tok.body)
        except UpstreamError as e:
            lease.release()
            raise _refusal(lease, e) from None
        except BaseException:
            lease.release()
            raise
        return translate.context_prompt(context, body.get("tokens") or [])

    async def chat(self, req: wire.ChatRequest) -> Reply:
        if not req.messages:
            now = translate.rfc3339()
            return await self._load_only(req.model, req.keep_alive, lambda reason: wire.ChatChunk(
                model=req.model, created_at=now, message=wire.OutMessage(role="assistant", content=""),
                done=True, done_reason=reason))
        start = self.clock()
        lease, target, call = await self._prepare(
            req.model, req.keep_alive, "chat", lambda t: translate.chat_request(req, t))
        self._note_num_ctx(req.options, target)
        state = translate.ChatStream(target.label, translate.Timing(start=start), top_logprobs=req.top_logprobs or 0)

        async def refit(refused: UpstreamError) -> translate.UpstreamCall:
            return await self._fit_context(lease, call, target, refused, truncate=req.truncate is not False)

        return await self._run(lease, call, state, refit)

    async def _fit_context(self, lease: Lease, call: translate.UpstreamCall, target: Target, refused: UpstreamError,
                           truncate: bool = True) -> translate.UpstreamCall:
        """The chat vLLM refused as too long for the context, without its oldest messages, as
        Ollama truncates a chat (system messages and the last message always stay). How many go
        is found from vLLM's /tokenize counts (`translate.ContextFit`: a few calls, only on this
        path). Raises Ollama's 400 when even the last message does not fit (or the client said
        ``truncate: false``), and vLLM's own refusal when the counting fails."""
        name = lease.runtime.name
        messages = call.body["messages"]
        fit = translate.ContextFit(translate.truncation_cuts(messages) if truncate else (),
                                   call.body.get("max_tokens"), target.max_model_len)
        counts = 0
        try:
            while (drop := fit.probe()) is not None:
                tok = translate.chat_tokenize_call(call, drop)
                answer = await self.upstream.post_json(lease.runtime.base_url, tok.path, tok.body)
                count = answer.get("count") if isinstance(answer, dict) else None
                limit = answer.get("max_model_len") if isinstance(answer, dict) else None
                if not isinstance(count, int):
                    raise UpstreamError(502, f"/tokenize answered without a count: {answer!r:.200}")
                fit.record(count, limit if isinstance(limit, int) else None)
                counts += 1
        except UpstreamError as e:
            log.warning("%s: the conversation is too long for the context and counting its tokens failed (%s): "
                        "answering vLLM's refusal", name, e.message)
            raise refused from None
        if fit.drop is None:
            log.info("%s: the conversation is too long for the context (%s tokens)%s: %s", name, fit.limit,
                     "" if truncate else " and the client asked not to truncate it", refused.message)
            raise UpstreamError(400, translate.CONTEXT_OVERFLOW)
        log.info("%s: the conversation is too long for the context (%s tokens): dropped its %d oldest of %d "
                 "messages, keeping %d tokens for the answer (%d token counts)", name, fit.limit, fit.drop,
                 len(messages), fit.room, counts)
        return translate.truncated_chat(call, fit.drop)

    async def _run(self, lease: Lease, call: translate.UpstreamCall, state: Any,
                   refit: Callable[[UpstreamError], Awaitable[translate.UpstreamCall]] | None = None) -> Reply:
        """`call` to vLLM, its answer translated by `state`. `refit`, given a refusal for the
        context's length (before any output), makes a shorter call to send instead, once."""
        base = lease.runtime.base_url
        state.timing.upstream = self.clock()
        if not call.body["stream"]:
            try:
                body = await self._refitting(
                    lease, call, lambda c: self.upstream.post_json(base, c.path, c.body), refit)
            except UpstreamError as e:
                lease.status = _upstream_status(e)
                self._unreachable(lease, e)
                raise _refusal(lease, e) from None
            except BaseException:
                lease.status = 499  # the client left
                raise
            else:
                usage = body.get("usage") or {}
                lease.usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
            finally:
                lease.release()
            now = self.clock()
            state.timing.last_token = now  # when the first token came is unknown: see Timing.metrics
            try:
                return Reply(body=_encode(state.whole(body, now)))
            except StreamAborted as e:
                raise ApiError(502, lease.explain(str(e))) from None
        events: AsyncIterator[list[dict[str, Any]]] | None = None

        async def first_batch(c: translate.UpstreamCall) -> list[dict[str, Any]] | None:
            nonlocal events
            events = self.upstream.events(base, c.path, c.body)
            try:
                return await anext(events)
            except StopAsyncIteration:
                return None

        # Read until vLLM sends output (its first chat chunk carries only the role) before
        # answering 200, so an error before any output keeps its status, as in Ollama, instead
        # of arriving as a 200 stream with an error line. The first output goes out at once.
        first: bytes | None = None
        try:
            batch = await self._refitting(lease, call, first_batch, refit)
            while batch is not None and events is not None:
                first = self._lines(state, batch)
                if first is not None:
                    lease.first_token()
                    break
                try:
                    batch = await anext(events)
                except StopAsyncIteration:
                    batch = None
        except (UpstreamError, StreamAborted) as e:
            refusal = _refusal(lease, e) if isinstance(e, UpstreamError) else ApiError(502, lease.explain(str(e)))
            lease.status = refusal.status
            lease.release()
            if isinstance(e, UpstreamError):
                self._unreachable(lease, e)
            if events is not None:
                await events.aclose()
            raise refusal from None
        except BaseException:
            lease.status = 499  # the client left
            lease.release()
            if events is not None:
                await events.aclose()
            raise
        assert events is not None
        return Reply(stream=self._relay(lease, events, first, batch is None, state))

    def _lines(self, state: Any, batch: list[dict[str, Any]]) -> bytes | None:
        """One upstream batch → its NDJSON lines as one write (None if it has nothing to show)."""
        now = self.clock()
        state.stamp = translate.rfc3339()
        chunk = state.chunk
        lines = [_encode(c) for data in batch if (c := chunk(data, now)) is not None]
        if not lines:
            return None
        lines.append(b"")
        return b"\n".join(lines)

    async def _refitting(self, lease: Lease, call: translate.UpstreamCall,
                         send: Callable[[translate.UpstreamCall], Awaitable[T]],
                         refit: Callable[[UpstreamError], Awaitable[translate.UpstreamCall]] | None) -> T:
        """`send(call)`; if vLLM refuses it as too long for the context and `refit` can make it
        fit, send the shorter call once (the normal path costs nothing more than the try)."""
        try:
            return await self._retrying(lease, lambda: send(call))
        except UpstreamError as e:
            if not translate.context_overflow(e.status, e.message):
                raise
            if refit is None:  # a prompt (/api/generate): refused in the words /api/chat uses
                raise UpstreamError(e.status, translate.overflow_message(e.message)) from None
            shorter = await refit(e)
        return await self._retrying(lease, lambda: send(shorter))

    async def _retrying(self, lease: Lease, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, once more if the model's server refused the connection (it crashed and is
        coming back): the request waits for the model like any request to a restarting one."""
        try:
            return await call()
        except UpstreamError as e:
            if not e.unreachable or not await self.fleet.recover(lease.runtime):
                raise
        return await call()

    async def _relay(self, lease: Lease, events: AsyncIterator[list[dict[str, Any]]], first: bytes | None,
                     ended: bool, state: Any) -> AsyncIterator[bytes]:
        """vLLM's chunks → NDJSON lines; the lines of one socket read go out as one write.

        `first` is the first output, already translated (None if the stream `ended` without
        any). Ends with the final chunk, or with an ``{"error"}`` line if vLLM fails mid-way.
        Closing this iterator early (the client left) closes the upstream connection,
        which makes vLLM abort the generation.
        """
        lines = self._lines
        sent = first is not None  # and counted for the time to first token
        try:
            if first is not None:
                yield first
            while not ended:
                try:
                    batch = await anext(events)
                except StopAsyncIteration:
                    break
                out = lines(state, batch)
                if out is not None:
                    if not sent:
                        sent = True
                        lease.first_token()
                    yield out
            yield _line(state.done(self.clock()))
        except UpstreamError as e:
            lease.status = 502
            why = lease.explain(e.message, e.status)
            log.warning("%s: stream ended by upstream error: %s", lease.runtime.name, why)
            yield _error_line(why)
        except StreamAborted as e:
            lease.status = 502
            why = lease.explain(str(e))
            log.warning("%s: %s", lease.runtime.name, why)
            yield _error_line(why)
        except BaseException:
            lease.status = 499  # the client left mid-stream
            raise
        finally:
            lease.usage(state.prompt_tokens, state.output_tokens)
            lease.release()
            await events.aclose()

    # --- embeddings -------------------------------------------------------------------

    async def _embedding_call(self, lease: Lease, call: translate.UpstreamCall) -> dict[str, Any]:
        """vLLM's embeddings for `call`; its prompt tokens go to the lease (for /metrics)."""
        try:
            body = await self.upstream.post_json(lease.runtime.base_url, call.path, call.body)
            usage = body.get("usage") if isinstance(body, dict) else None
            lease.usage((usage.get("prompt_tokens") or 0) if isinstance(usage, dict) else 0, 0)
            return body
        except UpstreamError as e:
            self._unreachable(lease, e)
            if translate.context_overflow(e.status, e.message):
                # An input too long with ``truncate: false``: Ollama's 400, in its words.
                refusal = ApiError(400, translate.overflow_message(e.message))
            else:
                refusal = _refusal(lease, e)
            lease.status = refusal.status
            raise refusal from None

    async def embed(self, req: wire.EmbedRequest) -> Reply:
        start = self.clock()
        lease, target, call = await self._prepare(
            req.model, req.keep_alive, "embed", lambda t: translate.embed_request(req, t))
        try:
            if not call.body["input"]:
                return Reply(body=_encode(wire.EmbedResponse(model=target.label, embeddings=[])))
            upstream_at = self.clock()
            body = await self._embedding_call(lease, call)
        finally:
            lease.release()
        metrics = {"total_duration": self.clock() - start, "load_duration": upstream_at - start}
        return Reply(body=_encode(translate.embed_response(body, target.label, req.dimensions, metrics)))

    async def embeddings(self, req: wire.EmbeddingsRequest) -> Reply:
        lease, _, call = await self._prepare(
            req.model, req.keep_alive, "embeddings", lambda t: translate.embeddings_request(req, t))
        try:
            if not req.prompt:
                return Reply(body=_encode(wire.EmbeddingsResponse(embedding=[])))
            body = await self._embedding_call(lease, call)
        finally:
            lease.release()
        return Reply(body=_encode(translate.embeddings_response(body)))
