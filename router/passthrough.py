"""OpenAI and Anthropic routes, passed through to the model's own vLLM server.

/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/messages (and
/v1/messages/count_tokens) are routed by the body's ``model``: a name or alias
of the registry, resolved to the name vLLM serves. The body goes on unchanged
(re-encoded only when the model name had to be rewritten); vLLM's answer comes
back byte for byte, server-sent events included, so the openai and anthropic
clients behave as against vLLM itself. /v1/models lists the registry.

Errors the router itself raises are in the shape of the API asked: OpenAI's
``{"error": {"message", "type", "param", "code"}}``, or Anthropic's
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.background_tasks import BackgroundTask
from litestar.params import FromPath
from litestar.response import Stream

from . import translate
from .config import Model
from .lifecycle import Fleet, Lease, ModelNotFound, ModelUnavailable
from .upstream import Upstream, UpstreamError

log = logging.getLogger("vllama.passthrough")

_encode = msgspec.json.Encoder().encode
_decode_dict = msgspec.json.Decoder(dict[str, Any]).decode

#: Request headers worth passing on to vLLM (never the client's credentials).
_FORWARD = ("content-type", "accept", "anthropic-version", "anthropic-beta", "openai-beta", "x-request-id")


class _ModelOnly(msgspec.Struct):
    model: Any = None


_decode_model = msgspec.json.Decoder(_ModelOnly).decode

_OPENAI_TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError",
                 502: "BadGatewayError", 504: "GatewayTimeoutError"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error",
                    502: "api_error", 504: "api_error"}


def openai_error(status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> Response[bytes]:
    body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}
    return Response(_encode(body), status_code=status, media_type="application/json", headers=headers)


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response[bytes]:
    body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return Response(_encode(body), status_code=status, media_type="application/json", headers=headers)


class Passthrough:
    def __init__(self, fleet: Fleet, upstream: Upstream) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.created = int(time.time())

    def entry(self, m: Model) -> dict[str, Any]:
        """One model as OpenAI describes it, plus vLLM's ``max_model_len`` when models.yaml sets it:
        the same in the list and on its own, so a client may read either."""
        entry: dict[str, Any] = {"id": m.name, "object": "model", "created": self.created, "owned_by": "vllama"}
        if m.max_model_len:
            entry["max_model_len"] = m.max_model_len
        return entry

    def models(self) -> dict[str, Any]:
        """/v1/models: every model of the registry, as OpenAI lists them."""
        return {"object": "list", "data": [self.entry(m) for m in self.fleet.config.models]}

    def model(self, name: str) -> dict[str, Any] | None:
        """/v1/models/{name}: the model `name` means (a name or an alias), or None."""
        m = self.fleet.config.lookup(name)
        return None if m is None else self.entry(m)

    def refusal(self, name: str, path: str) -> tuple[int, str] | None:
        """(status, message) when the registry alone says `path` cannot serve `name`: an
        unknown model, or an API the model does not have (embeddings from a model that
        generates, a generation from an embedding model, which vLLM answers with a bare 404).
        Checked before the model is waited for, so such a request never starts one."""
        model = self.fleet.config.lookup(name)
        if model is None:
            self._count("unknown", path, 404)
            return 404, f"The model `{name}` does not exist."
        try:
            translate.check_route(path, translate.Target(name=model.served_name, embedding=model.embedding,
                                                         label=name))
        except translate.TranslationError as e:
            self._count(model.name, path, e.status)
            return e.status, str(e)
        return None

    def _count(self, model: str, path: str, status: int) -> None:
        """A request refused before it held the model, counted as the fleet counts those it refuses."""
        metrics = getattr(self.fleet, "metrics", None)
        if metrics is not None:
            metrics.started(model, path.lstrip("/")).finished(status)

    async def forward(self, request: Request[Any, Any, Any], path: str, anthropic: bool = False) -> Response[Any]:
        error = anthropic_error if anthropic else openai_error
        body = await request.body()
        if not body:
            return error(400, "missing request body")
        try:
            name = _decode_model(body).model
        except msgspec.DecodeError as e:
            return error(400, f"invalid JSON: {e}")
        if not isinstance(name, str) or not name:
            return error(400, "model is required" if name is None or name == "" else "model must be a string")
        refused = self.refusal(name, path)
        if refused is not None:
            status, message = refused
            return error(status, message) if anthropic else openai_error(status, message, "model")
        try:
            lease: Lease = await self.fleet.acquire(name, endpoint=path.lstrip("/"))
        except ModelNotFound:
            return error(404, f"The model `{name}` does not exist.") if anthropic else \
                openai_error(404, f"The model `{name}` does not exist.", "model")
        except ModelUnavailable as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
            return error(503, e.message, headers=headers)
        served = lease.runtime.model.served_name
        if name != served:
            data = _decode_dict(body)
            data["model"] = served
            body = _encode(data)
        headers = {k: v for k in _FORWARD if (v := request.headers.get(k)) is not None}
        headers.setdefault("content-type", "application/json")
        def send() -> Any:
            return self.upstream.relay(lease.runtime.base_url, path, body, headers)

        try:
            try:
                status, resp_headers, chunks = await send()
            except UpstreamError as e:
                # The server was gone (crashed, restarting): wait for it like any request would.
                if not e.unreachable or not await self.fleet.recover(lease.runtime):
                    raise
                status, resp_headers, chunks = await send()
        except UpstreamError as e:
            lease.status = 502 if e.status >= 500 else e.status
            lease.release()
            return error(lease.status, lease.explain(e.message, e.status))
        except BaseException:
            lease.status = 499  # the client left
            lease.release()
            raise
        lease.status = status  # vLLM's verdict (a 400 for a prompt too long included) is the client's
        stream = _released(chunks, lease, "event-stream" in resp_headers.get("content-type", ""))
        return Stream(stream, status_code=status, headers=resp_headers,
                      media_type=resp_headers.get("content-type", "application/json"),
                      background=BackgroundTask(_close, stream))


def _sse_error(status: int, message: str) -> bytes:
    """The event that ends a server-sent stream cut mid-way, in OpenAI's error shape."""
    return b"data: " + _encode({"error": {"message": message, "type": "APIError", "param": None,
                                          "code": status}}) + b"\n\n"


async def _released(chunks: AsyncIterator[bytes], lease: Lease, events: bool) -> AsyncIterator[bytes]:
    """`chunks` as they come; the model's lease ends with the stream, however it ends.

    A body cut mid-way stays cut, as vLLM's own would be; a stream of server-sent
    `events` ends with an error event saying why (`Lease.explain`). The lease keeps the
    status the client was sent (set by `Passthrough.forward`), except that a body cut by
    the upstream counts as 502 and one the client left as 499, as the Ollama routes count
    theirs (`service.OllamaService`), so /metrics shows the failures.
    """
    try:
        async for chunk in chunks:
            yield chunk
    except UpstreamError as e:
        lease.status = 502
        why = lease.explain(e.message, e.status)
        log.warning("%s: pass-through ended by upstream error: %s", lease.runtime.name, why)
        if events:
            yield _sse_error(e.status, why)
    except BaseException:
        lease.status = 499  # the client left mid-stream
        raise
    finally:
        lease.release()
        await chunks.aclose()  # type: ignore[attr-defined]


async def _close(stream: AsyncIterator[bytes]) -> None:
    """After the response: close the relay even if the client left mid-stream (vLLM then aborts)."""
    await stream.aclose()  # type: ignore[attr-defined]


def passthrough_router(fleet: Fleet, upstream: Upstream) -> Router:
    p = Passthrough(fleet, upstream)

    @post("/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await p.forward(request, "/v1/chat/completions")

    @post("/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        return await p.forward(request, "/v1/completions")

    @post("/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
        return await p.forward(request, "/v1/embeddings")

    @post("/messages", status_code=200)
    async def messages(request: Request[Any, Any, Any]) -> Response[Any]:
        return await p.forward(request, "/v1/messages", anthropic=True)

    @post("/messages/count_tokens", status_code=200)
    async def count_tokens(request: Request[Any, Any, Any]) -> Response[Any]:
        return await p.forward(request, "/v1/messages/count_tokens", anthropic=True)

    @get("/models", sync_to_thread=False)
    def models() -> Response[bytes]:
        return Response(_encode(p.models()), media_type="application/json")

    @get("/models/{model:path}", sync_to_thread=False)
    def model(model: FromPath[str]) -> Response[bytes]:
        entry = p.model(model.lstrip("/"))
        if entry is None:
            return openai_error(404, f"The model `{model.lstrip('/')}` does not exist.", "model")
        return Response(_encode(entry), media_type="application/json")

    return Router(path="/v1", route_handlers=[chat_completions, completions, embeddings, messages, count_tokens,
                                              models, model], include_in_schema=True)
