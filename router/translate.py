"""Ollama ⇄ OpenAI translation: pure functions and small state machines, no I/O.

Requests: an Ollama request becomes the body of one vLLM OpenAI call
(`generate_request`, `chat_request`). Responses: `GenerateStream` and
`ChatStream` turn vLLM's chunks (or one non-streamed body) into Ollama's
chunks. Token counts always come from vLLM's ``usage``; durations are what the
router measured, passed in by the caller, so this module never reads a clock.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import wire

# vLLM's finish reasons → Ollama's done_reason. A finished tool call is a stop for Ollama.
_DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "abort": "stop"}

#: Options with no vLLM equivalent (hardware, llama.cpp internals); accepted and ignored.
IGNORED_OPTIONS = frozenset(
    {"num_gpu", "main_gpu", "num_thread", "num_batch", "num_keep", "use_mmap", "numa", "low_vram",
     "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "repeat_last_n"}
)


class TranslationError(Exception):
    """The request cannot be honoured as asked: a 400 with an Ollama-style message."""

    status = 400


@dataclass(frozen=True)
class Target:
    """What the translation needs to know about the model a request goes to."""

    name: str
    max_model_len: int | None = None
    thinking: bool = False


@dataclass(frozen=True)
class UpstreamCall:
    """One call to vLLM: which path, and the JSON body."""

    path: str
    body: dict[str, Any]


# --- time -----------------------------------------------------------------------


def rfc3339(ns: int | None = None) -> str:
    """UTC time in RFC 3339 with nanoseconds, trailing zeros trimmed, as Ollama writes it."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        stamp += "." + f"{frac:09d}".rstrip("0")
    return stamp + "Z"


# --- requests -------------------------------------------------------------------


def _int_option(name: str, value: float) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise TranslationError(f'option "{name}" must be a finite number')
    return int(value)


def sampling(options: wire.Options | None, target: Target) -> dict[str, Any]:
    """Ollama `options` → vLLM sampling parameters.

    vLLama does not impose Ollama's defaults (temperature 0.8, top_k 40…): a model
    without an option gets its own generation_config.json, as vLLM serves it.
    """
    out: dict[str, Any] = {}
    if options is None:
        return out
    o = options
    if o.num_predict is not None:
        n = _int_option("num_predict", o.num_predict)
        if n >= 0:
            out["max_tokens"] = n
        elif n not in (-1, -2):
            raise TranslationError(f"num_predict must be -1 (no limit), -2 (fill the context) or ≥ 0, got {n}")
    if o.temperature is not None:
        if not 0 <= o.temperature <= 100:
            raise TranslationError(f"temperature must be between 0 and 100, got {o.temperature}")
        out["temperature"] = float(o.temperature)
    if o.top_p is not None:
        if not 0 <= o.top_p <= 1:
            raise TranslationError(f"top_p must be between 0 and 1, got {o.top_p}")
        out["top_p"] = float(o.top_p) or 1.0
    if o.top_k is not None:
        k = _int_option("top_k", o.top_k)
        out["top_k"] = k if k > 0 else -1
    if o.min_p is not None:
        if not 0 <= o.min_p <= 1:
            raise TranslationError(f"min_p must be between 0 and 1, got {o.min_p}")
        out["min_p"] = float(o.min_p)
    if o.typical_p is not None and not 0 < o.typical_p <= 1:
        raise TranslationError(f"typical_p must be in (0, 1], got {o.typical_p}")
    if o.seed is not None:
        seed = _int_option("seed", o.seed)
        if seed >= 0:
            out["seed"] = seed
    if o.stop:
        out["stop"] = list(o.stop)
    if o.repeat_penalty is not None:
        if not 0 < o.repeat_penalty <= 10:
            raise TranslationError(f"repeat_penalty must be in (0, 10], got {o.repeat_penalty}")
        out["repetition_penalty"] = float(o.repeat_penalty)
    for key in ("presence_penalty", "frequency_penalty"):
        v = getattr(o, key)
        if v is not None:
            if not -2 <= v <= 2:
                raise TranslationError(f"{key} must be between -2 and 2, got {v}")
            out[key] = float(v)
    if o.num_ctx is not None:
        ctx = _int_option("num_ctx", o.num_ctx)
        if target.max_model_len is not None and ctx > target.max_model_len:
            raise TranslationError(
                f"num_ctx {ctx} exceeds the context length this model is served with "
                f"({target.max_model_len}); raise max_model_len in models.yaml"
            )
    return out


def response_format(fmt: wire.Format) -> dict[str, Any] | None:
    """Ollama `format` → OpenAI `response_format` (vLLM enforces it with structured output)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}
    raise TranslationError(f'invalid format: {fmt!r}: use "json" or a JSON schema object')


def check_images(images: list[str] | None) -> None:
    for i, img in enumerate(images or ()):
        try:
            base64.b64decode(img, validate=True)
        except (binascii.Error, ValueError):
            raise TranslationError(f"images[{i}]: illegal base64 data") from None


def _image_parts(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for img in images:
        parts.append({"type": "image_url", "image_url": {"url": f"data:{_sniff_mime(img)};base64,{img}"}})
    return parts


def _sniff_mime(b64: str) -> str:
    head = base64.b64decode(b64[:16] + "=" * (-len(b64[:16]) % 4), validate=False)
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"GIF8"):
        return "image/gif"
    if head[:4] == b"RIFF":
        return "image/webp"
    return "image/jpeg"


def _think(think: wire.Think, target: Target) -> dict[str, Any]:
    if think is None:
        return {}
    if isinstance(think, str) and think not in ("low", "medium", "high", "max", "true", "false"):
        raise TranslationError(f'invalid think value: "{think}" (use true, false, "low", "medium", "high" or "max")')
    enabled = think not in (False, "false")
    if enabled and not target.thinking:
        raise TranslationError(f'"{target.name}" does not support thinking')
    if not target.thinking:
        return {}
    extra: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": enabled}}
    if isinstance(think, str) and think in ("low", "medium", "high"):
        extra["reasoning_effort"] = think
    return extra


def _logprobs(logprobs: bool | None, top: int | None, chat: bool) -> dict[str, Any]:
    if top is not None and not 0 <= top <= 20:
        raise TranslationError("top_logprobs must be between 0 and 20")
    if not logprobs:
        return {}
    if chat:
        return {"logprobs": True, "top_logprobs": top or 0}
    return {"logprobs": top or 0}


def _common(body: dict[str, Any], stream: bool, options: wire.Options | None, target: Target) -> dict[str, Any]:
    body.update(sampling(options, target))
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def generate_request(req: wire.GenerateRequest, target: Target) -> UpstreamCall:
    """/api/generate → /v1/chat/completions (templated) or /v1/completions (raw)."""
    stream = req.stream is not False
    check_images(req.images)
    if req.raw and (req.template or req.system or req.context):
        raise TranslationError("raw mode does not support template, system, or context")
    if req.suffix:
        raise TranslationError(f'"{target.name}" does not support insert')
    fmt = response_format(req.format)
    if req.raw or req.template:
        prompt = render_template(req.template, req.system, req.prompt) if req.template else req.prompt
        body: dict[str, Any] = {"model": target.name, "prompt": prompt}
        body.update(_logprobs(req.logprobs, req.top_logprobs, chat=False))
        if fmt:
            body["response_format"] = fmt
        return UpstreamCall("/v1/completions", _common(body, stream, req.options, target))
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": req.system})
    messages.append({"role": "user", "content": _image_parts(req.prompt, req.images)})
    body = {"model": target.name, "messages": messages}
    body.update(_think(req.think, target))
    body.update(_logprobs(req.logprobs, req.top_logprobs, chat=True))
    if fmt:
        body["response_format"] = fmt
    return UpstreamCall("/v1/chat/completions", _common(body, stream, req.options, target))


def render_template(template: str, system: str | None, prompt: str) -> str:
    """The common subset of Ollama's Go templates: ``{{ .System }}``, ``{{ .Prompt }}``
    and ``{{ if .System }}…{{ end }}`` blocks. Anything else is refused, never guessed."""
    import re

    def cond(m: re.Match[str]) -> str:
        var, inner = m.group(1), m.group(2)
        value = system if var == "System" else prompt
        return inner if value else ""

    out = re.sub(r"\{\{-?\s*if\s+\.(System|Prompt)\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}", cond, template, flags=re.S)
    out = re.sub(r"\{\{-?\s*\.System\s*-?\}\}", lambda _: system or "", out)
    out = re.sub(r"\{\{-?\s*\.Prompt\s*-?\}\}", lambda _: prompt, out)
    out = re.sub(r"\{\{-?\s*\.Response\s*-?\}\}.*", "", out, flags=re.S)
    if "{{" in out:
        raise TranslationError("template uses Go template features vLLama does not render; "
                               "only .System, .Prompt and `if` blocks are supported")
    return out


def _chat_message(m: wire.Message, call_ids: dict[str, list[str]]) -> dict[str, Any]:
    role = m.role.lower()
    if role not in ("system", "user", "assistant", "tool"):
        raise TranslationError(f'invalid message role "{m.role}"')
    out: dict[str, Any] = {"role": role, "content": _image_parts(m.content, m.images)}
    if m.tool_calls:
        calls = []
        for i, tc in enumerate(m.tool_calls):
            cid = tc.id or f"call_{len(call_ids) + i}"
            call_ids.setdefault(tc.function.name, []).append(cid)
            calls.append({"id": cid, "type": "function",
                          "function": {"name": tc.function.name,
                                       "arguments": msgspec.json.encode(tc.function.arguments).decode()}})
        out["tool_calls"] = calls
    if role == "tool":
        # Ollama names the tool; OpenAI wants the id of the call this result answers.
        cid = m.tool_call_id
        if cid is None and m.tool_name and call_ids.get(m.tool_name):
            cid = call_ids[m.tool_name].pop(0)
        if cid is not None:
            out["tool_call_id"] = cid
        if m.tool_name:
            out["name"] = m.tool_name
    if m.thinking and role == "assistant":
        out["reasoning"] = m.thinking
    return out


def chat_request(req: wire.ChatRequest, target: Target) -> UpstreamCall:
    """/api/chat → /v1/chat/completions."""
    stream = req.stream is not False
    call_ids: dict[str, list[str]] = {}
    messages = []
    for m in req.messages or ():
        check_images(m.images)
        messages.append(_chat_message(m, call_ids))
    body: dict[str, Any] = {"model": target.name, "messages": messages}
    if req.tools:
        body["tools"] = [
            {"type": t.type, "function": msgspec.to_builtins(t.function)} for t in req.tools
        ]
    fmt = response_format(req.format)
    if fmt:
        body["response_format"] = fmt
    body.update(_think(req.think, target))
    body.update(_logprobs(req.logprobs, req.top_logprobs, chat=True))
    return UpstreamCall("/v1/chat/completions", _common(body, stream, req.options, target))


# --- responses ------------------------------------------------------------------


@dataclass
class Timing:
    """Router-side clock readings (ns, monotonic) the caller records."""

    start: int
    """When the request reached the router."""
    upstream: int = 0
    """When it was sent to vLLM (after waiting for the model to be ready)."""
    first_token: int = 0
    last_token: int = 0

    def metrics(self, now: int, prompt_tokens: int, output_tokens: int) -> dict[str, int]:
        up = self.upstream or self.start
        first = self.first_token or now
        last = self.last_token or now
        return {
            "total_duration": now - self.start,
            "load_duration": up - self.start,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": max(0, first - up),
            "eval_count": output_tokens,
            "eval_duration": max(0, last - first),
        }


def _logprobs_out(lp: Mapping[str, Any] | None) -> list[wire.Logprob] | None:
    """OpenAI chat logprobs (``{"content": [{token, logprob, bytes, top_logprobs}]}``) → Ollama's."""
    if not lp:
        return None
    items = lp.get("content") or []
    return [
        wire.Logprob(token=i.get("token", ""), logprob=float(i.get("logprob", 0.0)), bytes=i.get("bytes"),
                     top_logprobs=[wire.Logprob(token=t.get("token", ""), logprob=float(t.get("logprob", 0.0)))
                                   for t in i.get("top_logprobs") or []] or None)
        for i in items
    ] or None


def _arguments(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return {"__raw": raw}
    return value if isinstance(value, dict) else {"value": value}


@dataclass
class _ToolAcc:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Stream:
    """Shared state of a response being translated."""

    model: str
    timing: Timing
    prompt_tokens: int = 0
    output_tokens: int = 0
    done_reason: str | None = None
    usage_seen: bool = False

    def _usage(self, chunk: Mapping[str, Any]) -> None:
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", 0) or 0
            self.output_tokens = usage.get("completion_tokens", 0) or 0
            self.usage_seen = True

    def _finish(self, choice: Mapping[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if reason:
            self.done_reason = _DONE_REASON.get(reason, "stop")

    def final_metrics(self, now: int) -> dict[str, int]:
        return self.timing.metrics(now, self.prompt_tokens, self.output_tokens)


class GenerateStream(_Stream):
    """vLLM chunks (completions or chat completions) → /api/generate chunks."""

    def chunk(self, data: Mapping[str, Any], now: int) -> wire.GenerateChunk | None:
        """One upstream chunk → one Ollama chunk (None if it carries no text)."""
        self._usage(data)
        choices = data.get("choices")
        if not choices:
            return None
        choice = choices[0]
        self._finish(choice)
        delta = choice.get("delta")
        if delta is not None:
            text = delta.get("content") or ""
            thinking = delta.get("reasoning") or delta.get("reasoning_content")
        else:
            text = choice.get("text") or ""
            thinking = None
        if not text and not thinking:
            return None
        if not self.timing.first_token:
            self.timing.first_token = now
        self.timing.last_token = now
        return wire.GenerateChunk(model=self.model, created_at=rfc3339(), response=text, done=False,
                                  thinking=thinking or None, logprobs=_logprobs_out(choice.get("logprobs")))

    def done(self, now: int) -> wire.GenerateChunk:
        return wire.GenerateChunk(model=self.model, created_at=rfc3339(), response="", done=True,
                                  done_reason=self.done_reason or "stop", **self.final_metrics(now))

    def whole(self, body: Mapping[str, Any], now: int) -> wire.GenerateChunk:
        """A non-streamed vLLM response → the one /api/generate object."""
        self._usage(body)
        choice = (body.get("choices") or [{}])[0]
        self._finish(choice)
        msg = choice.get("message")
        if msg is not None:
            text = msg.get("content") or ""
            thinking = msg.get("reasoning") or msg.get("reasoning_content")
        else:
            text, thinking = choice.get("text") or "", None
        return wire.GenerateChunk(model=self.model, created_at=rfc3339(), response=text, done=True,
                                  thinking=thinking or None, done_reason=self.done_reason or "stop",
                                  logprobs=_logprobs_out(choice.get("logprobs")), **self.final_metrics(now))


class ChatStream(_Stream):
    """vLLM chat chunks → /api/chat chunks; tool-call fragments are assembled first.

    OpenAI streams a tool call's arguments as string fragments; Ollama sends each
    call whole, with `arguments` as an object, so calls are emitted once complete.
    """

    def __init__(self, model: str, timing: Timing) -> None:
        super().__init__(model, timing)
        self._tools: dict[int, _ToolAcc] = {}

    def chunk(self, data: Mapping[str, Any], now: int) -> wire.ChatChunk | None:
        self._usage(data)
        choices = data.get("choices")
        if not choices:
            return None
        choice = choices[0]
        self._finish(choice)
        delta = choice.get("delta") or {}
        for tc in delta.get("tool_calls") or ():
            acc = self._tools.setdefault(tc.get("index", len(self._tools)), _ToolAcc())
            acc.id = tc.get("id") or acc.id
            fn = tc.get("function") or {}
            acc.name += fn.get("name") or ""
            if fn.get("arguments"):
                acc.arguments.append(fn["arguments"])
        text = delta.get("content") or ""
        thinking = delta.get("reasoning") or delta.get("reasoning_content")
        calls = self._take_tools() if choice.get("finish_reason") else None
        if not text and not thinking and not calls:
            return None
        if not self.timing.first_token:
            self.timing.first_token = now
        self.timing.last_token = now
        msg = wire.OutMessage(role="assistant", content=text, thinking=thinking or None, tool_calls=calls)
        return wire.ChatChunk(model=self.model, created_at=rfc3339(), message=msg, done=False,
                              logprobs=_logprobs_out(choice.get("logprobs")))

    def _take_tools(self) -> list[wire.ToolCall] | None:
        if not self._tools:
            return None
        calls = [
            wire.ToolCall(id=acc.id, function=wire.ToolCallFunction(
                index=i, name=acc.name, arguments=_arguments("".join(acc.arguments))))
            for i, acc in sorted(self._tools.items())
        ]
        self._tools.clear()
        return calls

    def done(self, now: int) -> wire.ChatChunk:
        calls = self._take_tools()
        return wire.ChatChunk(model=self.model, created_at=rfc3339(),
                              message=wire.OutMessage(role="assistant", content="", tool_calls=calls), done=True,
                              done_reason=self.done_reason or "stop", **self.final_metrics(now))

    def whole(self, body: Mapping[str, Any], now: int) -> wire.ChatChunk:
        self._usage(body)
        choice = (body.get("choices") or [{}])[0]
        self._finish(choice)
        msg = choice.get("message") or {}
        calls = [
            wire.ToolCall(id=tc.get("id"), function=wire.ToolCallFunction(
                index=i, name=(tc.get("function") or {}).get("name", ""),
                arguments=_arguments((tc.get("function") or {}).get("arguments"))))
            for i, tc in enumerate(msg.get("tool_calls") or ())
        ] or None
        thinking = msg.get("reasoning") or msg.get("reasoning_content")
        out = wire.OutMessage(role="assistant", content=msg.get("content") or "", thinking=thinking or None,
                           tool_calls=calls)
        return wire.ChatChunk(model=self.model, created_at=rfc3339(), message=out, done=True,
                              done_reason=self.done_reason or "stop",
                              logprobs=_logprobs_out(choice.get("logprobs")), **self.final_metrics(now))


def upstream_error_message(status: int, body: bytes) -> str:
    """vLLM's error body (``{"error": {"message"}}`` or the older flat form) → one message."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text or f"upstream returned HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return f"upstream returned HTTP {status}"
