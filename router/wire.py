"""Ollama's wire types as msgspec structs.

Requests decode with unknown fields ignored (Ollama ignores them too) and a
JSON null meaning the field was left out (Go's decoder leaves a field as it is on
null); the types double as the OpenAPI schema Litestar publishes. Responses omit unset
fields, as Ollama's ``omitempty`` does, but keep the ones its clients require
(``response``, ``message.content``, ``done``).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

Number = int | float
Format = str | dict[str, Any] | None
KeepAlive = str | int | float | None
Think = bool | str | None
TokenId = Annotated[int, Meta(ge=0, description="A token id of the model's vocabulary")]
"""A token of ``context``: checked here, so a bad one is a 400 naming the field rather than
vLLM's dump of one validation error per token."""


class NullIsUnset(Struct):
    """A request type where JSON null means "not set", as for Ollama's Go decoder: a field with a
    default other than None is annotated ``X | None`` and gets its default back after decoding."""

    def __post_init__(self) -> None:
        cls = type(self)
        spec = _DEFAULTS.get(cls)
        if spec is None:
            spec = _DEFAULTS[cls] = tuple(
                (f.name, f.default, f.default_factory) for f in msgspec.structs.fields(cls)
                if f.default is not None and not (f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT))
        for name, default, factory in spec:
            if getattr(self, name) is None:
                setattr(self, name, factory() if default is msgspec.NODEFAULT else default)


_DEFAULTS: dict[type, tuple[tuple[str, Any, Any], ...]] = {}


class Options(Struct, omit_defaults=True):
    """Ollama's `options`. Unknown keys are accepted and ignored, as Ollama does."""

    num_predict: Number | None = None
    temperature: Number | None = None
    top_k: Number | None = None
    top_p: Number | None = None
    min_p: Number | None = None
    typical_p: Number | None = None
    seed: Number | None = None
    stop: list[str] | None = None
    repeat_penalty: Number | None = None
    repeat_last_n: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    num_ctx: Number | None = None
    num_keep: Number | None = None
    num_batch: Number | None = None
    num_gpu: Number | None = None
    main_gpu: Number | None = None
    num_thread: Number | None = None
    use_mmap: bool | None = None
    mirostat: Number | None = None
    mirostat_tau: Number | None = None
    mirostat_eta: Number | None = None
    penalize_newline: bool | None = None
    low_vram: bool | None = None
    numa: bool | None = None


class ToolCallFunction(NullIsUnset):
    """Every key always written: Ollama's clients require `arguments`, even when empty."""

    name: str
    arguments: dict[str, Any] | str | None = msgspec.field(default_factory=dict)
    """An object in Ollama's form; a JSON string (OpenAI's habit) is accepted on input."""
    index: int | None = None


class ToolCall(Struct, omit_defaults=True):
    function: ToolCallFunction
    id: str | None = None


class ToolFunction(Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(NullIsUnset, omit_defaults=True):
    function: ToolFunction
    type: str | None = "function"


class Message(NullIsUnset, omit_defaults=True):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class OutMessage(Struct, omit_defaults=True):
    """A response message: `content` is always present (Ollama's clients expect it)."""

    role: str
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class GenerateRequest(NullIsUnset, omit_defaults=True):
    model: str | None = ""
    prompt: str | None = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[TokenId] | None = None
    stream: bool | None = None
    raw: bool | None = False
    format: Format = None
    images: list[str] | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatRequest(NullIsUnset, omit_defaults=True):
    model: str | None = ""
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    stream: bool | None = None
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: Think = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None
    """False: a conversation too long for the context is a 400 rather than losing its oldest messages."""


class EmbedRequest(NullIsUnset, omit_defaults=True):
    model: str | None = ""
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(NullIsUnset, omit_defaults=True):
    model: str | None = ""
    prompt: str | None = ""
    options: Options | None = None
    keep_alive: KeepAlive = None


class ModelRequest(NullIsUnset, omit_defaults=True):
    """Body of /api/show, /api/delete, /api/pull (``name`` is the legacy key)."""

    model: str | None = ""
    name: str | None = ""
    verbose: bool | None = None
    stream: bool | None = None
    insecure: bool | None = None

    @property
    def target(self) -> str:
        return self.model or self.name


# --- responses ------------------------------------------------------------------


class Logprob(Struct, omit_defaults=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[Logprob] | None = None


class GenerateChunk(Struct, omit_defaults=True):
    model: str
    created_at: str
    response: str
    done: bool
    thinking: str | None = None
    done_reason: str | None = None
    context: list[int] | None = None
    logprobs: list[Logprob] | None = None
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0


class ChatChunk(Struct, omit_defaults=True):
    model: str
    created_at: str
    message: OutMessage
    done: bool
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0


class ErrorBody(Struct):
    error: str


class ModelDetails(Struct):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(Struct, omit_defaults=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails
    download: str = ""
    """vLLama's addition (clients ignore it): downloaded, partial, not downloaded, local, remote."""


class RunningModel(Struct):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class TagsResponse(Struct):
    models: list[ListedModel]


class PsResponse(Struct):
    models: list[RunningModel]


class VersionResponse(Struct):
    version: str


class EmbedResponse(Struct, omit_defaults=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class EmbeddingsResponse(Struct):
    embedding: list[float]


class TensorInfo(Struct):
    name: str
    type: str
    shape: list[int]


class ShowResponse(Struct, omit_defaults=True):
    details: ModelDetails
    model_info: dict[str, Any]
    """Always present (the Python client requires the key), at least ``{}``."""
    capabilities: list[str]
    template: str = ""
    parameters: str = ""
    license: str = ""
    modelfile: str = ""
    system: str = ""
    modified_at: str = ""
    tensors: list[TensorInfo] | None = None


class StatusResponse(Struct, omit_defaults=True):
    status: str
    digest: str | None = None
    total: int = 0
    completed: int = 0
