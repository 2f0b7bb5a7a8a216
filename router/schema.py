"""The published OpenAPI document (``/openapi/openapi.json``), made to say what the routes answer.

Litestar derives the document from the handlers' types, which leaves gaps: it
documents its own validation-error shape where every route answers Ollama's
``{"error": "..."}`` (or OpenAI's / Anthropic's on the pass-through routes),
it knows neither the statuses the service raises (404, 413, 502, 503 …) nor
the streamed media types (NDJSON, server-sent events), and the pass-through
handlers read their body raw, so it has no request schema for them. `document`
fills these in on the app's (cached) document before it is first served, so
that clients and schema-driven tests (tests/test_fuzz.py runs schemathesis
against it) see the API as it is.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Reference,
    RequestBody,
    Schema,
)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

_DESCRIPTIONS = {
    400: "Bad request: malformed JSON, a wrong type (the message names the field), a missing model, a bad option",
    401: "Missing or invalid API key (when server.auth is enabled)",
    403: "The API key may not do this (an admin route, or a model it may not use)",
    404: "No such model (or no such model file)",
    408: "The request head or body did not arrive in time",
    409: "The model is in use",
    413: "Request body larger than server.max_body_mb",
    501: "Not supported by vLLama (models are defined in models.yaml)",
    502: "The model server failed or could not be reached",
    503: "Server busy (server.max_inflight), model queue full, or model not available now; see Retry-After",
    504: "The model server timed out",
}

#: Routes that run a model (their errors include the model server's).
_GENERATION = {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
               "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens"}
_STREAMED_NDJSON = {"/api/generate", "/api/chat", "/api/pull"}
_PUBLIC = {"/", "/api/version"}
#: Ollama routes answered with a deliberate 501 that says what to do instead.
_REFUSED = {"/api/copy", "/api/create", "/api/push", "/api/blobs/{digest}"}


def _error_ref(path: str) -> Reference:
    if path.startswith("/v1/messages"):
        return Reference("#/components/schemas/AnthropicError")
    if path.startswith("/v1/"):
        return Reference("#/components/schemas/OpenAIError")
    return Reference("#/components/schemas/Error")


def _error_schemas() -> dict[str, Schema]:
    string = Schema(type=OpenAPIType.STRING)
    return {
        "Error": Schema(type=OpenAPIType.OBJECT, properties={"error": string}, required=["error"],
                        description="Ollama's error shape"),
        "OpenAIError": Schema(
            type=OpenAPIType.OBJECT, required=["error"], description="OpenAI's error shape",
            properties={"error": Schema(type=OpenAPIType.OBJECT, required=["message"], properties={
                "message": string, "type": string,
                "param": Schema(one_of=[string, Schema(type=OpenAPIType.NULL)]),
                "code": Schema(one_of=[Schema(type=OpenAPIType.INTEGER), string, Schema(type=OpenAPIType.NULL)]),
            })}),
        "AnthropicError": Schema(
            type=OpenAPIType.OBJECT, required=["type", "error"], description="Anthropic's error shape",
            properties={"type": string, "error": Schema(type=OpenAPIType.OBJECT, required=["type", "message"],
                                                        properties={"type": string, "message": string})}),
    }


def _statuses(method: str, path: str, has_body: bool) -> set[int]:
    if path in _PUBLIC:
        return set()
    out = {401, 403, 503}
    if has_body or method == "post":
        out |= {400, 413, 408}
    if path in _GENERATION or path in ("/api/show", "/api/pull", "/api/delete") or "{" in path:
        out |= {400, 404}
    if path in _GENERATION or path == "/api/pull":
        out |= {502, 504}
    if path == "/api/delete" or path.startswith("/vllama/"):
        out |= {400, 404, 409}
    if path in _REFUSED:
        out.add(501)
    return out


def _model_body(*required: str) -> RequestBody:
    props: dict[str, Schema | Reference] = {name: Schema(type=OpenAPIType.STRING) for name in ("model",)}
    if "messages" in required:
        props["messages"] = Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.OBJECT))
    if "max_tokens" in required:
        props["max_tokens"] = Schema(type=OpenAPIType.INTEGER)
    return RequestBody(required=True, content={"application/json": OpenAPIMediaType(schema=Schema(
        type=OpenAPIType.OBJECT, properties=props, required=["model", *required]))})


_PASSTHROUGH_BODIES = {
    "/v1/chat/completions": ("messages",),
    "/v1/completions": (),
    "/v1/embeddings": (),
    "/v1/messages": ("messages", "max_tokens"),
    "/v1/messages/count_tokens": ("messages",),
}


def document(app: Litestar) -> None:
    """Complete `app`'s OpenAPI document in place (call before it is first served)."""
    if app.openapi_config is None:
        return
    doc = app.openapi_schema
    if doc.components.schemas is None:
        doc.components.schemas = {}
    doc.components.schemas.update(_error_schemas())
    any_object = Schema(type=OpenAPIType.OBJECT)
    for path, item in (doc.paths or {}).items():
        for method in ("get", "post", "put", "delete", "head", "patch"):
            op = getattr(item, method, None)
            if op is None:
                continue
            if path in _PASSTHROUGH_BODIES and op.request_body is None:
                op.request_body = _model_body(*_PASSTHROUGH_BODIES[path])
            responses: dict[str, Any] = op.responses if op.responses is not None else {}
            op.responses = responses
            if path in _REFUSED:  # never succeeds
                for code in ("200", "201"):
                    responses.pop(code, None)
            error_schema: Reference | Schema = _error_ref(path)
            if path.startswith("/v1/") and method == "post":  # or vLLM's own error body, passed on as it is
                error_schema = Schema(any_of=[error_schema, Schema(
                    type=OpenAPIType.OBJECT, description="the model server's own error body, passed through")])
            error = OpenAPIMediaType(schema=error_schema)
            codes = {int(c) for c in responses if c.isdigit() and int(c) >= 400}
            for code in sorted(codes | _statuses(method, path, op.request_body is not None)):
                headers = {"Retry-After": OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING),
                                                        description="Seconds to wait before retrying")} \
                    if code == 503 else None
                responses[str(code)] = OpenAPIResponse(
                    description=_DESCRIPTIONS.get(code, "Error"), content={"application/json": error},
                    headers=headers)
            ok = next((responses[c] for c in ("200", "201", "202") if c in responses), None)
            if not isinstance(ok, OpenAPIResponse):
                continue
            if method == "head":
                ok.content = None
                continue
            content = ok.content or {}
            if path.startswith("/v1/"):
                if method == "post":  # vLLM's own answer, passed through
                    content = {"application/json": OpenAPIMediaType(schema=any_object),
                               SSE: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))}
                else:
                    content = {"application/json": OpenAPIMediaType(schema=any_object)}
            if path in _STREAMED_NDJSON:
                content[NDJSON] = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
            ok.content = content
