"""Ollama ⇄ OpenAI translation: pure functions and small state machines, no I/O.

Requests: an Ollama request becomes the body of one vLLM OpenAI call
(`generate_request`, `chat_request`, `embed_request`…). Responses:
`GenerateStream` and `ChatStream` turn vLLM's chunks (or one non-streamed body)
into Ollama's chunks; `embed_response` and `embeddings_response` do the same
for embeddings. Token counts always come from vLLM's ``usage``; durations are
what the router measured, passed in by the caller, so this module never reads
a monotonic clock (only the wall clock, for ``created_at``).

Decisions worth knowing (each one is tested in tests/test_translate.py):

* Sampling defaults: vLLama does not impose Ollama's defaults (temperature 0.8,
  top_k 40, top_p 0.9); an option the client leaves out gets the model's own
  generation_config.json, as vLLM serves it.
* ``top_p: 0`` keeps only the most likely token, as in Ollama: vLLM refuses top_p 0,
  so it becomes ``top_k: 1`` (the other options keep their meaning).
* Values Ollama's sampler accepts and vLLM refuses are mapped as Ollama runs them, never
  refused: temperature < 0 is greedy (0), top_p is clamped into [0, 1], top_k <= 0 and
  repeat_penalty <= 0 are off, min_p is clamped into [0, 1]; where vLLM's range is narrower
  than what Ollama applies, the value is clamped to vLLM's (temperature at most 2,
  presence/frequency_penalty within ±2). Empty stop strings are dropped; more stop strings
  than the model's vLLM accepts (``VLLM_MAX_STOP_STRINGS``, see engine.MAX_STOP_STRINGS)
  are one clear 400.
* ``num_predict``: n > 0 → ``max_tokens``; -1, -2, 0 and any other n < 0 → no
  ``max_tokens`` (vLLM then fills the context, which is what -2 asks for; Ollama's
  runner treats any n <= 0 as no limit).
* ``top_logprobs`` are the k most likely tokens, sorted, as Ollama's: vLLM is asked for
  one more where needed (`_logprobs`), and the answer sorted and cut to k.
* Options vLLM has no equivalent for (num_gpu, num_thread, mirostat*, typical_p,
  tfs_z, num_keep, repeat_last_n…) are accepted and ignored, as Ollama ignores
  unknown ones. ``num_ctx`` does not reach vLLM (the context is fixed when a model is
  served); one above the served context is clamped to it, as Ollama clamps it to what
  the model supports, never a 400 (the service logs it: `oversized_num_ctx`).
* ``format``: "json" → ``response_format: json_object``; a schema →
  ``json_schema`` (vLLM's structured output enforces it).
* ``think``: only for models served with a reasoning parser; true/levels turn the
  template's thinking switch on (``enable_thinking``/``thinking``; levels also
  set ``reasoning_effort``), false turns it off and drops any reasoning text.
  Unset means on for such a model, as in Ollama.
* ``raw``, a request ``template`` and ``context`` go to vLLM's completions API (text or
  token ids): images are refused there (400) rather than dropped, and a thinking model's
  reasoning stays in ``response`` (that API has no reasoning parser).
* A chat whose last message is the assistant's, with content, continues that
  message (vLLM's ``continue_final_message``) rather than starting a new turn.
* A chat too long for the context (vLLM refuses it: `context_overflow`) loses its
  oldest messages, never the system messages nor the latest one, as Ollama's chatPrompt
  does; `truncation_cuts` says where a conversation may be cut and `ContextFit` how far,
  from vLLM's token counts. Only a refused request pays for it.
* A vLLM request-validation 400 (pydantic's error list) becomes one readable line
  (`readable_error`) on the Ollama API; the /v1 routes pass vLLM's body on as it is.
* Tool calls keep vLLM's ids. A tool result without ``tool_call_id`` (the
  Ollama clients send only ``tool_name``) answers the earliest unanswered call
  of that name, or else the earliest unanswered call. Calls that arrive without
  an id get ``call_<n>`` numbered by position, so a conversation renders the same
  on every turn (prefix caching stays warm).
"""

from __future__ import annotations

import ast
import base64
import binascii
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import wire

# vLLM's finish reasons → Ollama's done_reason. A finished tool call is a stop for Ollama.
_DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop"}

#: Options with no vLLM equivalent (hardware, llama.cpp internals); accepted and ignored.
IGNORED_OPTIONS = frozenset(
    {"num_gpu", "main_gpu", "num_thread", "num_batch", "num_keep", "use_mmap", "use_mlock", "numa", "low_vram",
     "f16_kv", "logits_all", "vocab_only", "embedding_only", "mirostat", "mirostat_tau", "mirostat_eta",
     "penalize_newline", "repeat_last_n", "typical_p", "tfs_z"}
)

THINK_LEVELS = ("low", "medium", "high", "max")

MAX_TEMPERATURE = 2.0
"""vLLM's highest temperature (it refuses more); a hotter one is sent as this."""

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


class TranslationError(Exception):
    """The request cannot be honoured as asked: a 400 with an Ollama-style message."""

    status = 400


class StreamAborted(Exception):
    """vLLM ended a generation without finishing it (``finish_reason: abort``)."""


@dataclass(frozen=True)
class Target:
    """What the translation needs to know about the model a request goes to."""

    name: str
    """The name vLLM serves the model under (aliases already resolved)."""
    max_model_len: int | None = None
    """The context length the model is served with, when known."""
    thinking: bool = False
    """Served with a reasoning parser."""
    tools: bool = False
    """Served with a tool-call parser."""
    embedding: bool = False
    """Served with ``--runner pooling``: embeddings only."""
    max_stop: int | None = None
    """The most stop strings the model's vLLM accepts (its ``VLLM_MAX_STOP_STRINGS``), when known."""
    label: str = ""
    """The model as the client named it, for error messages."""

    @property
    def shown(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class UpstreamCall:
    """One call to vLLM: which path, and the JSON body."""

    path: str
    body: dict[str, Any]


# --- time -----------------------------------------------------------------------

_stamp_cache: list[Any] = [-1, ""]


def rfc3339(ns: int | None = None) -> str:
    """UTC time in RFC 3339 with nanoseconds, trailing zeros trimmed, as Ollama writes it.

    The seconds part is formatted once per second: this runs for every chunk.
    """
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    cache = _stamp_cache
    if cache[0] != secs:
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        cache[0] = secs
    if frac:
        return f"{cache[1]}.{frac:09d}".rstrip("0") + "Z"
    return cache[1] + "Z"


# --- requests -------------------------------------------------------------------


def _int_option(name: str, value: float) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise TranslationError(f'option "{name}" must be a finite number')
    if not -(2**63) <= value < 2**63:  # what Ollama's (Go) decoder accepts; vLLM must never see more
        raise TranslationError(f'option "{name}" is out of range, got {value:g}')
    return int(value)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise TranslationError(f'option "{name}" must be a finite number')
    return float(value)


def _clamp(name: str, value: float, lo: float, hi: float) -> float:
    """`value` brought into [lo, hi]: Ollama's sampler takes any number and clamps (or ignores)
    what is out of range, where vLLM refuses it. Only a non-number is refused."""
    return float(min(max(_finite(name, value), lo), hi))


def _stops(stop: Sequence[str], target: Target) -> list[str]:
    """The stop strings for vLLM. Empty ones are dropped: vLLM refuses them, and Ollama's runner
    finds one in any text, so it would end every answer empty at once, which no client means.
    More than the model's vLLM accepts (its ``VLLM_MAX_STOP_STRINGS``, which vLLama raises well
    above vLLM's default of 4) are refused here in one sentence, not by vLLM's validation dump."""
    out = [s for s in stop if s]
    if target.max_stop is not None and len(out) > target.max_stop:
        raise TranslationError(f'option "stop" has {len(out)} strings; "{target.shown}" accepts at most '
                               f"{target.max_stop} (VLLM_MAX_STOP_STRINGS in its env)")
    return out


def sampling(options: wire.Options | None, target: Target) -> dict[str, Any]:
    """Ollama `options` → vLLM sampling parameters (see the module docstring for the rules).

    Values Ollama's sampler accepts but vLLM refuses are mapped to what Ollama does with them
    (a negative temperature is greedy, top_p ≥ 1 and top_k ≤ 0 are off…), never refused.
    """
    out: dict[str, Any] = {}
    if options is None:
        return out
    o = options
    if o.num_predict is not None:
        n = _int_option("num_predict", o.num_predict)
        if n > 0:  # Ollama's runner: any n <= 0 is no limit
            if target.max_model_len is not None and n > target.max_model_len:
                # vLLM refuses max_tokens above max_model_len; Ollama stops at the context's end.
                n = target.max_model_len
            out["max_tokens"] = n
    if o.temperature is not None:
        # Ollama: below 0 is greedy (0). vLLM refuses more than MAX_TEMPERATURE.
        out["temperature"] = _clamp("temperature", o.temperature, 0, MAX_TEMPERATURE)
    top_p = None if o.top_p is None else _clamp("top_p", o.top_p, 0, 1)  # Ollama: >= 1 is off
    if top_p:
        out["top_p"] = top_p
    if o.top_k is not None:
        k = _int_option("top_k", o.top_k)
        out["top_k"] = max(0, k)  # Ollama: <= 0 is off; vLLM: 0 = all tokens
    if top_p == 0:
        # Ollama keeps the most likely token alone; vLLM wants top_p in (0, 1]: that is top_k 1.
        out["top_k"] = 1
    if o.min_p is not None:
        out["min_p"] = _clamp("min_p", o.min_p, 0, 1)
    if o.seed is not None:
        seed = _int_option("seed", o.seed)
        if seed >= 0:  # Ollama: -1 = random
            out["seed"] = seed
    if o.stop:
        stops = _stops(o.stop, target)
        if stops:
            out["stop"] = stops
    if o.repeat_penalty is not None:
        rp = _finite("repeat_penalty", o.repeat_penalty)
        if rp > 0:  # Ollama's sampler takes <= 0 as off (1.0), as llama.cpp takes 0
            out["repetition_penalty"] = rp
    for key in ("presence_penalty", "frequency_penalty"):
        v = getattr(o, key)
        if v is not None:
            out[key] = _clamp(key, v, -2, 2)  # vLLM's range; Ollama applies any value
    if o.num_ctx is not None:
        # Checked like any int option, then left out: vLLM's context is the one the model is
        # served with. More than that is clamped to it (see `oversized_num_ctx`), never a 400.
        _int_option("num_ctx", o.num_ctx)
    return out


def oversized_num_ctx(options: wire.Options | None, target: Target) -> int | None:
    """The ``num_ctx`` asked for when it is more than the context `target` is served with
    (Ollama clamps it to what the model supports and logs a warning); None otherwise."""
    if options is None or options.num_ctx is None or target.max_model_len is None:
        return None
    try:
        ctx = _int_option("num_ctx", options.num_ctx)
    except TranslationError:
        return None
    return ctx if ctx > target.max_model_len else None


def response_format(fmt: wire.Format) -> dict[str, Any] | None:
    """Ollama `format` → OpenAI `response_format` (vLLM enforces it with structured output)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}
    raise TranslationError(f'invalid format: {fmt!r}: expected "json" or a JSON schema object')


def check_images(images: Sequence[str] | None) -> None:
    for img in images or ():
        try:
            base64.b64decode(img, validate=True)
        except (binascii.Error, ValueError) as e:
            raise TranslationError(f"illegal base64 data in image: {e}") from None


def _image_parts(text: str, images: Sequence[str] | None) -> str | list[dict[str, Any]]:
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
        # Ollama: a thinking model thinks unless told not to (some templates default to off).
        think = target.thinking
    if isinstance(think, str):
        level = think.lower()
        if level in ("true", "false"):
            think = level == "true"
        elif level not in THINK_LEVELS:
            raise TranslationError(
                f'invalid think value: "{think}" (use true, false, "low", "medium", "high" or "max")')
    enabled = think is not False
    if not target.thinking:
        if enabled:
            raise TranslationError(f'"{target.shown}" does not support thinking')
        return {}
    # Templates name the switch differently (Qwen3: enable_thinking; DeepSeek, Granite:
    # thinking); vLLM passes on only the variables a template declares.
    extra: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": enabled, "thinking": enabled}}
    if isinstance(think, str):
        extra["reasoning_effort"] = think.lower()
    if not enabled:
        extra["include_reasoning"] = False
    return extra


MAX_TOP_LOGPROBS = 20
"""Ollama's limit for ``top_logprobs``, and vLLM's default ``--max-logprobs``."""


def _logprobs(logprobs: bool | None, top: int | None, chat: bool) -> dict[str, Any]:
    """Ollama's ``logprobs``/``top_logprobs`` → vLLM's.

    Ollama's ``top_logprobs`` are the k most likely tokens. vLLM's are not quite: its sampler
    gives the sampled token, then the most likely ones (vllm/v1/engine/logprobs.py), and the
    chat API keeps the first k of those, so when the sampled token is not among the k most
    likely, the k-th is missing. Asking for k+1 brings it back (`_logprobs_out` sorts and keeps
    k); at k = 20, vLLM's maximum, the 20th may stay missing. The completions API keeps the
    sampled token *and* the k most likely, so k is enough there.
    """
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise TranslationError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    if not logprobs:
        return {}
    k = top or 0
    if chat:
        return {"logprobs": True, "top_logprobs": min(k + 1, MAX_TOP_LOGPROBS) if k else 0}
    return {"logprobs": k}


def _finish_body(body: dict[str, Any], stream: bool, options: wire.Options | None, target: Target) -> dict[str, Any]:
    body.update(sampling(options, target))
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _check_generates(target: Target, what: str) -> None:
    """An embedding model (``--runner pooling``) has no generation API: refused here, in
    Ollama's words, rather than with vLLM's bare 404."""
    if target.embedding:
        raise TranslationError(f'"{target.shown}" does not support {what}')


def _check_generate(req: wire.GenerateRequest, target: Target) -> None:
    _check_generates(target, "generate")
    check_images(req.images)
    if req.raw and (req.template or req.system or req.context):
        raise TranslationError("raw mode does not support template, system, or context")
    if req.suffix:
        raise TranslationError(f'"{target.shown}" does not support insert')
    if req.images and (req.raw or req.template or req.context):
        # These go to vLLM's completions API as text or token ids, which carry no image.
        raise TranslationError("images cannot be sent with raw, template or context: "
                               "send them without those, or through /api/chat")
    _think(req.think, target)  # a bad or unsupported `think` is refused on every path


def _generate_messages(req: wire.GenerateRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": req.system})
    messages.append({"role": "user", "content": _image_parts(req.prompt, req.images)})
    return messages


def generate_request(
    req: wire.GenerateRequest, target: Target, prompt_ids: list[int] | None = None
) -> UpstreamCall:
    """/api/generate → /v1/chat/completions (through the model's chat template) or
    /v1/completions (``raw``, a request ``template``, or a continuation of ``context``,
    whose token ids `prompt_ids` the caller built with `tokenize_request`).

    Templated requests ask vLLM for token ids, so the final chunk can carry Ollama's
    ``context`` (prompt tokens + generated tokens).
    """
    _check_generate(req, target)
    stream = req.stream is not False
    fmt = response_format(req.format)
    if prompt_ids is not None or req.raw or req.template:
        if prompt_ids is not None:
            prompt: str | list[int] = prompt_ids
        elif req.template:
            prompt = render_template(req.template, req.system, req.prompt)
        else:
            prompt = req.prompt
        body: dict[str, Any] = {"model": target.name, "prompt": prompt}
        if not req.raw:
            body["return_token_ids"] = True
        body.update(_logprobs(req.logprobs, req.top_logprobs, chat=False))
        if fmt:
            body["response_format"] = fmt
        return UpstreamCall("/v1/completions", _finish_body(body, stream, req.options, target))
    body = {"model": target.name, "messages": _generate_messages(req), "return_token_ids": True}
    body.update(_think(req.think, target))
    body.update(_logprobs(req.logprobs, req.top_logprobs, chat=True))
    if fmt:
        body["response_format"] = fmt
    return UpstreamCall("/v1/chat/completions", _finish_body(body, stream, req.options, target))


def tokenize_request(req: wire.GenerateRequest, target: Target) -> UpstreamCall:
    """The /tokenize call that turns a generate request's new turn into token ids
    (templated as vLLM would), to be appended to the request's ``context``."""
    _check_generate(req, target)
    if req.template:
        return UpstreamCall("/tokenize", {"model": target.name, "add_special_tokens": False,
                                          "prompt": render_template(req.template, req.system, req.prompt)})
    body: dict[str, Any] = {"model": target.name, "messages": _generate_messages(req), "add_generation_prompt": True}
    kwargs = _think(req.think, target).get("chat_template_kwargs")
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    return UpstreamCall("/tokenize", body)


def with_prompt(call: UpstreamCall, prompt_ids: list[int]) -> UpstreamCall:
    """A continuation's call (built, and so checked, before the model was waited for, with
    no prompt yet) with the token ids `tokenize_request` and `context_prompt` gave."""
    return UpstreamCall(call.path, {**call.body, "prompt": prompt_ids})


def context_prompt(context: Sequence[int], new_tokens: Sequence[int]) -> list[int]:
    """Ollama's continuation: the earlier exchange's tokens, then the new turn's.

    The new turn was templated on its own, so it starts with the BOS token the
    context already starts with; that second copy is dropped.
    """
    new = list(new_tokens)
    if context and new and new[0] == context[0]:
        new = new[1:]
    return [*context, *new]


_GO_IF = re.compile(r"\{\{-?\s*if\s+\.(System|Prompt)\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}", re.DOTALL)
_GO_SYSTEM = re.compile(r"\{\{-?\s*\.System\s*-?\}\}")
_GO_PROMPT = re.compile(r"\{\{-?\s*\.Prompt\s*-?\}\}")
_GO_RESPONSE = re.compile(r"\{\{-?\s*\.Response\s*-?\}\}.*", re.DOTALL)


def render_template(template: str, system: str | None, prompt: str) -> str:
    """The common subset of Ollama's Go templates: ``{{ .System }}``, ``{{ .Prompt }}``,
    ``{{ if .System }}…{{ end }}`` blocks, and ``{{ .Response }}`` (where the answer goes:
    rendering stops there). Anything else is refused, never guessed."""

    def cond(m: re.Match[str]) -> str:
        value = system if m.group(1) == "System" else prompt
        return m.group(2) if value else ""

    out = _GO_IF.sub(cond, template)
    out = _GO_SYSTEM.sub(lambda _: system or "", out)
    out = _GO_PROMPT.sub(lambda _: prompt, out)
    out = _GO_RESPONSE.sub("", out)
    if "{{" in out:
        raise TranslationError("template uses Go template features vLLama does not render; "
                               "only .System, .Prompt, .Response and `if` blocks are supported")
    return out


class _Calls:
    """Tool calls of a conversation that still wait for their result."""

    def __init__(self) -> None:
        self.count = 0
        self.pending: list[tuple[str, str]] = []  # (function name, call id), oldest first

    def add(self, name: str, cid: str | None) -> str:
        cid = cid or f"call_{self.count:09d}"
        self.count += 1
        self.pending.append((name, cid))
        return cid

    def answer(self, cid: str | None, name: str | None) -> str | None:
        """The id of the call a tool result answers, which then stops waiting."""
        for i, (n, c) in enumerate(self.pending):
            if (cid is not None and c == cid) or (cid is None and (name is None or n == name)):
                del self.pending[i]
                return c
        if cid is None and name is not None and self.pending:
            # The client named a tool no call asked for: answer the oldest call.
            return self.pending.pop(0)[1]
        return cid


def _arguments_json(args: dict[str, Any] | str) -> str:
    if isinstance(args, str):
        return args or "{}"
    return _json_encode(args).decode()


def _chat_message(m: wire.Message, calls: _Calls) -> dict[str, Any]:
    role = m.role.lower()
    out: dict[str, Any] = {"role": role, "content": _image_parts(m.content or "", m.images)}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": calls.add(tc.function.name, tc.id), "type": "function",
             "function": {"name": tc.function.name, "arguments": _arguments_json(tc.function.arguments)}}
            for tc in m.tool_calls
        ]
    if role == "tool":
        cid = calls.answer(m.tool_call_id, m.tool_name)
        if cid is not None:
            out["tool_call_id"] = cid
        if m.tool_name:
            out["name"] = m.tool_name
    if m.thinking and role == "assistant":
        out["reasoning"] = m.thinking
    return out


def chat_messages(messages: Sequence[wire.Message]) -> list[dict[str, Any]]:
    calls = _Calls()
    out = []
    for m in messages:
        check_images(m.images)
        out.append(_chat_message(m, calls))
    return out


def chat_request(req: wire.ChatRequest, target: Target) -> UpstreamCall:
    """/api/chat → /v1/chat/completions."""
    _check_generates(target, "chat")
    stream = req.stream is not False
    messages = req.messages or ()
    body: dict[str, Any] = {"model": target.name, "messages": chat_messages(messages)}
    if messages and messages[-1].role.lower() == "assistant" and messages[-1].content:
        # Ollama continues a final assistant message (a prefill) instead of starting a new turn;
        # vLLM answers with the continuation alone (no ``echo``), as Ollama does.
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if req.tools:
        if not target.tools:
            raise TranslationError(
                f'"{target.shown}" does not support tools (set tool_call_parser for it in models.yaml)')
        body["tools"] = [
            {"type": t.type or "function", "function": msgspec.to_builtins(t.function)} for t in req.tools
        ]
    fmt = response_format(req.format)
    if fmt:
        body["response_format"] = fmt
    body.update(_think(req.think, target))
    body.update(_logprobs(req.logprobs, req.top_logprobs, chat=True))
    return UpstreamCall("/v1/chat/completions", _finish_body(body, stream, req.options, target))


# --- context overflow -------------------------------------------------------------------

CONTEXT_OVERFLOW = "the input length exceeds the context length"
"""Ollama's 400 (its runner's words) when a prompt cannot be made to fit the context."""

ANSWER_ROOM = 4096
"""Tokens a chat cut to fit keeps free for the answer when the request sets no num_predict
(at most a quarter of the context). Ollama's runner shifts its context when an answer reaches
the end; vLLM stops there, so a conversation cut to the context's last token would leave the
answer one token, and the next turn would overflow again."""


def overflow_message(detail: str) -> str:
    """A prompt vLLM refused as too long, in Ollama's words (as /api/chat, and /api/embed with
    ``truncate: false``, answer it: a 400), with vLLM's numbers after them."""
    return f"{CONTEXT_OVERFLOW}: {detail}" if detail else CONTEXT_OVERFLOW


def context_overflow(status: int, message: str) -> bool:
    """vLLM refused a request, before any output, because its prompt does not fit the context.

    vLLM 0.32 words it "This model's maximum context length is N tokens. However, your prompt
    contains M input tokens, …" (or "… M characters …" for a text too long to tokenize;
    renderers/params.py), or "Input length (M) exceeds model's maximum context length (N)."
    (get_max_tokens); a prompt exactly as long as the context leaves no room for a token:
    "max_tokens must be at least 1, got 0." (the router itself never asks for 0 tokens).
    """
    if status != 400:
        return False
    return "maximum context length" in message or message.startswith("max_tokens must be at least 1, got 0")


def _tool_block_start(roles: Sequence[Any], messages: Sequence[Mapping[str, Any]], i: int) -> int:
    """Ollama's toolBlockStartIndex: a cut at a tool result moves back to the assistant turn
    whose calls it answers, so a result never stays without its call."""
    if i <= 0 or roles[i] != "tool":
        return i
    start = i
    while start > 0 and roles[start - 1] == "tool":
        start -= 1
    call = start - 1
    if call >= 0 and roles[call] == "assistant" and messages[call].get("tool_calls"):
        return call
    return i


def truncation_cuts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """How many of a chat's oldest non-system messages may be dropped, fewest first (OpenAI
    messages, as `chat_messages` makes them).

    As Ollama's chatPrompt: the system messages and the last message always stay, and a cut
    never parts tool results from the assistant turn that called them. One more rule here: a
    cut that would start the conversation on an assistant turn moves on to the next user
    message, when one comes before the last message, because chat templates that insist on
    user/assistant alternation (Gemma's, Mistral's) refuse a conversation that starts with
    the assistant; Ollama renders with its own templates, which do not. The last entry keeps
    only the system messages and the last message; none when nothing can be dropped.
    """
    last = len(messages) - 1
    if last < 1:
        return []
    roles = [m.get("role") for m in messages]
    before = [0] * (last + 2)  # before[i]: non-system messages ahead of index i
    for i, role in enumerate(roles):
        before[i + 1] = before[i] + (role != "system")
    next_user: list[int | None] = [None] * (last + 2)  # the first user message at index >= i
    for i in range(last, -1, -1):
        next_user[i] = i if roles[i] == "user" else next_user[i + 1]
    cuts: set[int] = set()
    for i in range(1, last + 1):
        start = _tool_block_start(roles, messages, i)
        user = next_user[start + 1] if roles[start] == "assistant" and start < last else None
        if user is not None:
            start = user
        if before[start]:
            cuts.add(before[start])
    return sorted(cuts)


def drop_oldest(messages: Sequence[Mapping[str, Any]], drop: int) -> list[Mapping[str, Any]]:
    """`messages` without the `drop` oldest non-system ones."""
    out = []
    for m in messages:
        if drop and m.get("role") != "system":
            drop -= 1
            continue
        out.append(m)
    return out


@dataclass
class ContextFit:
    """How many messages a chat that vLLM found too long must lose, from token counts.

    The caller asks `probe` for the next cut to count (a value of `cuts`: vLLM's /tokenize on
    the chat with that many messages dropped, `chat_tokenize_call`) and passes the count to
    `record`, until `probe` says None; then `drop` is the number of messages to drop, or None
    if nothing fits. The deepest cut is counted first: if the system messages and the last
    message leave no room for a token, nothing fits (one count). Otherwise the fewest messages
    are dropped such that the prompt and the answer's room fit, found by bisection (a shorter
    conversation has fewer tokens): 1 + ceil(log2(len(cuts))) counts in all. The answer's room
    is the request's max_tokens, else `ANSWER_ROOM` (a quarter of a smaller context), never
    more than the deepest cut leaves.
    """

    cuts: Sequence[int]
    max_tokens: int | None = None
    limit: int | None = None
    """The context length; each /tokenize answer says it too (``max_model_len``)."""
    room: int = 0
    """Tokens kept free for the answer, once the deepest cut is counted."""
    drop: int | None = None
    done: bool = False
    _lo: int = 0
    _hi: int = -1
    _asked: int = -1

    def probe(self) -> int | None:
        if self.done:
            return None
        if not self.cuts:
            self.done = True
            return None
        if self._hi < 0:
            self._asked = len(self.cuts) - 1
        elif self._lo >= self._hi:
            self.drop = self.cuts[self._hi]
            self.done = True
            return None
        else:
            self._asked = (self._lo + self._hi) // 2
        return self.cuts[self._asked]

    def record(self, count: int, limit: int | None = None) -> None:
        """The token count of the cut `probe` asked for (and the context, when the answer says it)."""
        if limit:
            self.limit = limit
        if self.limit is None:
            self.done = True
            return
        if self._hi < 0:
            if count >= self.limit:
                self.done = True  # not even the last message alone leaves room for a token
                return
            want = self.max_tokens or min(ANSWER_ROOM, max(1, self.limit // 4))
            self.room = max(1, min(want, self.limit - count))
            self._lo, self._hi = 0, len(self.cuts) - 1
        elif count + self.room <= self.limit:
            self._hi = self._asked
        else:
            self._lo = self._asked + 1


def chat_tokenize_call(chat: UpstreamCall, drop: int) -> UpstreamCall:
    """The /tokenize call counting `chat`'s prompt with its `drop` oldest messages dropped,
    rendered as /v1/chat/completions renders it (same template switches, tools, effort)."""
    b = chat.body
    body: dict[str, Any] = {"model": b["model"], "messages": drop_oldest(b["messages"], drop)}
    for key in ("add_generation_prompt", "continue_final_message", "tools"):
        if key in b:
            body[key] = b[key]
    kwargs = dict(b.get("chat_template_kwargs") or {})
    if b.get("reasoning_effort") is not None:
        kwargs.setdefault("reasoning_effort", b["reasoning_effort"])  # vLLM passes it to the template
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    return UpstreamCall("/tokenize", body)


def truncated_chat(chat: UpstreamCall, drop: int) -> UpstreamCall:
    """`chat` with its `drop` oldest non-system messages (and their images) left out."""
    return UpstreamCall(chat.path, {**chat.body, "messages": drop_oldest(chat.body["messages"], drop)})


# --- embeddings -------------------------------------------------------------------


def _check_embedding(target: Target) -> None:
    if not target.embedding:
        raise TranslationError(
            f'"{target.shown}" does not support embeddings (serve an embedding model with embedding: true)')


_OPENAI_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "generate", "/v1/messages": "chat"}


def check_route(path: str, target: Target) -> None:
    """A pass-through request the model cannot serve, refused from the registry before the
    model is waited for: embeddings from a model that generates, a generation from an
    embedding model (vLLM would answer a bare 404 ``Not Found``)."""
    if path == "/v1/embeddings":
        _check_embedding(target)
    elif path in _OPENAI_ROUTES:
        _check_generates(target, _OPENAI_ROUTES[path])


def embed_inputs(req: wire.EmbedRequest) -> list[str]:
    """/api/embed's `input` as a list; an empty string or list means nothing to embed."""
    if isinstance(req.input, str):
        return [req.input] if req.input else []
    return list(req.input or ())


def embed_request(req: wire.EmbedRequest, target: Target) -> UpstreamCall:
    """/api/embed → /v1/embeddings. ``truncate`` (default true) cuts inputs to the context;
    ``dimensions`` is applied to the answer (`embed_response`), so every model honours it."""
    _check_embedding(target)
    if req.dimensions is not None and req.dimensions < 0:
        raise TranslationError(f"dimensions must be a positive number, got {req.dimensions}")
    body: dict[str, Any] = {"model": target.name, "input": embed_inputs(req)}
    if req.truncate is not False:
        body["truncate_prompt_tokens"] = -1
    return UpstreamCall("/v1/embeddings", body)


def embeddings_request(req: wire.EmbeddingsRequest, target: Target) -> UpstreamCall:
    """Legacy /api/embeddings → /v1/embeddings, unnormalised as Ollama returns it."""
    _check_embedding(target)
    return UpstreamCall("/v1/embeddings", {"model": target.name, "input": [req.prompt],
                                           "truncate_prompt_tokens": -1, "use_activation": False})


def _vectors(body: Mapping[str, Any]) -> list[list[float]]:
    data = sorted(body.get("data") or (), key=lambda d: d.get("index", 0))
    return [d.get("embedding") or [] for d in data]


def normalize(vec: Sequence[float]) -> list[float]:
    """L2-normalised copy of `vec` (a zero vector stays zero)."""
    norm = math.sqrt(math.fsum(x * x for x in vec))
    if norm == 0:
        return list(vec)
    return [x / norm for x in vec]


def embed_response(body: Mapping[str, Any], model: str, dimensions: int | None,
                   metrics: Mapping[str, int]) -> wire.EmbedResponse:
    """vLLM's /v1/embeddings answer → /api/embed's: L2-normalised, cut to `dimensions` first."""
    out = []
    for vec in _vectors(body):
        if dimensions is not None and 0 < dimensions < len(vec):
            vec = vec[:dimensions]
        out.append(normalize(vec))
    usage = body.get("usage") or {}
    return wire.EmbedResponse(model=model, embeddings=out, prompt_eval_count=usage.get("prompt_tokens") or 0,
                              total_duration=metrics.get("total_duration", 0),
                              load_duration=metrics.get("load_duration", 0))


def embeddings_response(body: Mapping[str, Any]) -> wire.EmbeddingsResponse:
    vectors = _vectors(body)
    return wire.EmbeddingsResponse(embedding=vectors[0] if vectors else [])


# --- responses ------------------------------------------------------------------


@dataclass
class Timing:
    """Router-side clock readings (ns, monotonic) the caller records."""

    start: int
    """When the request reached the router."""
    upstream: int = 0
    """When it was sent to vLLM (after waiting for the model to be ready)."""
    first_token: int = 0
    """When the first output arrived; 0 when unknown (a non-streamed answer) or none came."""
    last_token: int = 0

    def metrics(self, now: int, prompt_tokens: int, output_tokens: int) -> dict[str, int]:
        up = self.upstream or self.start
        last = self.last_token or now
        out = {
            "total_duration": max(1, now - self.start),
            "load_duration": up - self.start,
            "prompt_eval_count": prompt_tokens,
            "eval_count": output_tokens,
        }
        first = self.first_token
        if first:
            # Tokens that arrive in one read share a timestamp; clients divide counts by these
            # durations (tokens/s), so a measured duration with tokens behind it is never 0.
            out["prompt_eval_duration"] = max(1 if prompt_tokens else 0, first - up)
            out["eval_duration"] = max(1 if output_tokens else 0, last - first)
        elif output_tokens:
            # Not streamed: when prefill ended is unknown. The generation's whole time is the
            # eval time; prompt_eval_duration is left out (0 is omitted, as Ollama's Go omits it)
            # rather than made up.
            out["eval_duration"] = max(1, last - up)
        else:
            out["prompt_eval_duration"] = max(1 if prompt_tokens else 0, now - up)  # no output: all prefill
        return out


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def _top(entries: list[wire.Logprob], top: int | None) -> list[wire.Logprob] | None:
    """The `top` most likely of `entries`, most likely first (all of them, sorted, when `top`
    is None), as Ollama lists ``top_logprobs``; vLLM lists the sampled token first."""
    entries.sort(key=lambda e: e.logprob, reverse=True)  # stable: ties keep vLLM's order
    if top is not None:
        del entries[top:]
    return entries or None


def _logprobs_out(lp: Mapping[str, Any] | None, top: int | None = None) -> list[wire.Logprob] | None:
    """vLLM logprobs → Ollama's ``[{token, logprob, bytes, top_logprobs}]``, with the `top`
    most likely tokens at each position (see `_logprobs` for why vLLM may send more).

    Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``;
    completions: ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}]}``.
    """
    if not lp:
        return None
    items = lp.get("content")
    if items is not None:
        return [
            wire.Logprob(
                token=i.get("token", ""), logprob=float(i.get("logprob", 0.0)),
                bytes=i.get("bytes") if i.get("bytes") is not None else _token_bytes(i.get("token", "")),
                top_logprobs=_top([wire.Logprob(token=t.get("token", ""), logprob=float(t.get("logprob", 0.0)),
                                                bytes=t.get("bytes"))
                                   for t in i.get("top_logprobs") or ()], top))
            for i in items
        ] or None
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out = []
    for n, tok in enumerate(tokens):
        value = values[n] if n < len(values) and values[n] is not None else 0.0
        alts = tops[n] if n < len(tops) and tops[n] else {}
        out.append(wire.Logprob(
            token=tok, logprob=float(value), bytes=_token_bytes(tok),
            top_logprobs=_top([wire.Logprob(token=t, logprob=float(v), bytes=_token_bytes(t))
                               for t, v in alts.items()], top)))
    return out or None


def _arguments(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """A tool call's arguments as Ollama's object (vLLM sends a JSON string)."""
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = _json_decode(raw)
    except msgspec.DecodeError:
        # Not JSON (a model that wrote broken arguments): keep the text rather than lose it.
        return {"arguments": raw}
    return value if isinstance(value, dict) else {"value": value}


@dataclass
class _ToolAcc:
    index: int
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def call(self) -> wire.ToolCall:
        return wire.ToolCall(id=self.id, function=wire.ToolCallFunction(
            index=self.index, name=self.name, arguments=_arguments("".join(self.arguments))))


class _Stream:
    """Shared state of a response being translated.

    `stamp` is the ``created_at`` of the chunks being made; the caller refreshes it
    once per batch of chunks (one socket read) rather than once per chunk. `top_logprobs` is
    the request's (0 when it asked for none): vLLM may send more (see `_logprobs`).
    """

    def __init__(self, model: str, timing: Timing, top_logprobs: int | None = None) -> None:
        self.model = model
        self.timing = timing
        self.top_logprobs = top_logprobs
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.done_reason: str | None = None
        self.usage_seen = False
        self.engine: Mapping[str, Any] | None = None
        self.stamp = ""

    def _usage(self, usage: Mapping[str, Any], engine: Mapping[str, Any] | None) -> None:
        self.prompt_tokens = usage.get("prompt_tokens", 0) or 0
        self.output_tokens = usage.get("completion_tokens", 0) or 0
        self.usage_seen = True
        if engine:
            self.engine = engine

    def _choice(self, data: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Take the usage a chunk carries; return its first choice (None for a usage-only chunk)."""
        usage = data.get("usage")
        if usage:
            self._usage(usage, data.get("metrics"))
        choices = data.get("choices")
        return choices[0] if choices else None

    def _finish(self, reason: str) -> None:
        if reason == "abort" or reason == "error":
            raise StreamAborted("the model server aborted the generation" if reason == "abort"
                                else "the model server failed during generation")
        self.done_reason = _DONE_REASON.get(reason, "stop")

    def _token_seen(self, now: int) -> None:
        if not self.timing.first_token:
            self.timing.first_token = now
        self.timing.last_token = now

    def final_metrics(self, now: int) -> dict[str, int]:
        """Ollama's counters: tokens from vLLM's usage; durations as the router measured them,
        or vLLM's own (prefill and decode times) when it reports them (``--enable-per-request-metrics``).
        A non-streamed answer without vLLM's timings has no prompt_eval_duration: the split is unknown."""
        out = self.timing.metrics(now, self.prompt_tokens, self.output_tokens)
        engine = self.engine
        if engine:
            ttft, gen = engine.get("time_to_first_token_ms"), engine.get("generation_time_ms")
            if isinstance(ttft, int | float):
                out["prompt_eval_duration"] = int(ttft * 1_000_000)
            if isinstance(gen, int | float):
                out["eval_duration"] = int(gen * 1_000_000)
        return out


class GenerateStream(_Stream):
    """vLLM chunks (completions or chat completions) → /api/generate chunks.

    With `want_context`, token ids vLLM sends (``return_token_ids``) are collected
    for the final chunk's ``context``.
    """

    def __init__(self, model: str, timing: Timing, want_context: bool = False,
                 top_logprobs: int | None = None) -> None:
        super().__init__(model, timing, top_logprobs)
        self.want_context = want_context
        self.context: list[int] = []

    def _ids(self, top: Mapping[str, Any], choice: Mapping[str, Any]) -> None:
        prompt = top.get("prompt_token_ids") or choice.get("prompt_token_ids")
        if prompt:
            self.context[:0] = prompt
        ids = choice.get("token_ids")
        if ids:
            self.context.extend(ids)

    def chunk(self, data: Mapping[str, Any], now: int) -> wire.GenerateChunk | None:
        """One upstream chunk → one Ollama chunk (None if it carries nothing to show)."""
        choice = self._choice(data)
        if choice is None:
            return None
        reason = choice.get("finish_reason")
        if reason:
            self._finish(reason)
        if self.want_context:
            self._ids(data, choice)
        delta = choice.get("delta")
        if delta is not None:
            text = delta.get("content") or ""
            thinking = delta.get("reasoning") or delta.get("reasoning_content")
        else:
            text = choice.get("text") or ""
            thinking = None
        lp = choice.get("logprobs")
        if not text and not thinking and not lp:
            return None
        self._token_seen(now)
        return wire.GenerateChunk(model=self.model, created_at=self.stamp or rfc3339(), response=text, done=False,
                                  thinking=thinking or None, logprobs=_logprobs_out(lp, self.top_logprobs) if lp else None)

    def done(self, now: int) -> wire.GenerateChunk:
        return wire.GenerateChunk(model=self.model, created_at=rfc3339(), response="", done=True,
                                  done_reason=self.done_reason or "stop",
                                  context=self.context if self.want_context else None, **self.final_metrics(now))

    def whole(self, body: Mapping[str, Any], now: int) -> wire.GenerateChunk:
        """A non-streamed vLLM response → the one /api/generate object."""
        usage = body.get("usage")
        if usage:
            self._usage(usage, body.get("metrics"))
        choice = (body.get("choices") or [{}])[0]
        if choice.get("finish_reason"):
            self._finish(choice["finish_reason"])
        if self.want_context:
            self._ids(body, choice)
        msg = choice.get("message")
        if msg is not None:
            text = msg.get("content") or ""
            thinking = msg.get("reasoning") or msg.get("reasoning_content")
        else:
            text, thinking = choice.get("text") or "", None
        return wire.GenerateChunk(model=self.model, created_at=rfc3339(), response=text, done=True,
                                  thinking=thinking or None, done_reason=self.done_reason or "stop",
                                  context=self.context if self.want_context else None,
                                  logprobs=_logprobs_out(choice.get("logprobs"), self.top_logprobs), **self.final_metrics(now))


class ChatStream(_Stream):
    """vLLM chat chunks → /api/chat chunks; tool-call fragments are assembled first.

    OpenAI streams a tool call's arguments as string fragments; Ollama sends each
    call whole, with `arguments` as an object. A call is sent as soon as it is
    complete: when the next call starts, or when the choice finishes.
    """

    def __init__(self, model: str, timing: Timing, top_logprobs: int | None = None) -> None:
        super().__init__(model, timing, top_logprobs)
        self._tools: dict[int, _ToolAcc] = {}

    def _take_tools(self) -> list[wire.ToolCall] | None:
        if not self._tools:
            return None
        calls = [acc.call() for _, acc in sorted(self._tools.items())]
        self._tools.clear()
        return calls

    def _tool_deltas(self, deltas: Sequence[Mapping[str, Any]]) -> list[wire.ToolCall] | None:
        ready: list[wire.ToolCall] | None = None
        for tc in deltas:
            index = tc.get("index")
            if index is None:
                index = max(self._tools, default=-1) + 1 if tc.get("id") else max(self._tools, default=0)
            acc = self._tools.get(index)
            if acc is None:
                done = self._take_tools()  # a new call starts: the earlier ones are complete
                if done:
                    ready = (ready or []) + done
                acc = self._tools[index] = _ToolAcc(index)
            if tc.get("id"):
                acc.id = tc["id"]
            fn = tc.get("function")
            if fn:
                if fn.get("name"):
                    acc.name += fn["name"]
                args = fn.get("arguments")
                if args:
                    if isinstance(args, dict):  # some servers send the object whole
                        args = _json_encode(args).decode()
                    acc.arguments.append(args)
        return ready

    def chunk(self, data: Mapping[str, Any], now: int) -> wire.ChatChunk | None:
        choice = self._choice(data)
        if choice is None:
            return None
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        thinking = delta.get("reasoning") or delta.get("reasoning_content")
        deltas = delta.get("tool_calls")
        calls = self._tool_deltas(deltas) if deltas else None
        reason = choice.get("finish_reason")
        if reason:
            self._finish(reason)
            rest = self._take_tools()
            if rest:
                calls = (calls or []) + rest
        lp = choice.get("logprobs")
        if not text and not thinking and not calls and not lp:
            return None
        self._token_seen(now)
        msg = wire.OutMessage(role="assistant", content=text, thinking=thinking or None, tool_calls=calls)
        return wire.ChatChunk(model=self.model, created_at=self.stamp or rfc3339(), message=msg, done=False,
                              logprobs=_logprobs_out(lp, self.top_logprobs) if lp else None)

    def done(self, now: int) -> wire.ChatChunk:
        calls = self._take_tools()  # a stream that ended without finish_reason
        return wire.ChatChunk(model=self.model, created_at=rfc3339(),
                              message=wire.OutMessage(role="assistant", content="", tool_calls=calls), done=True,
                              done_reason=self.done_reason or "stop", **self.final_metrics(now))

    def whole(self, body: Mapping[str, Any], now: int) -> wire.ChatChunk:
        usage = body.get("usage")
        if usage:
            self._usage(usage, body.get("metrics"))
        choice = (body.get("choices") or [{}])[0]
        if choice.get("finish_reason"):
            self._finish(choice["finish_reason"])
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
                              logprobs=_logprobs_out(choice.get("logprobs"), self.top_logprobs), **self.final_metrics(now))


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


_VALIDATION_HEAD = re.compile(r"\d+ validation errors?:\n")
_PY_STR = r"'(?:[^'\\]|\\.)*'" r'|"(?:[^"\\]|\\.)*"'
"""A Python str literal as repr() writes it: in single quotes, or in double quotes when the
text has a single quote and no double one."""
_ERROR_FIELD = re.compile(rf"'(type|loc|msg)': ({_PY_STR})")


def readable_error(message: str) -> str:
    """A vLLM request-validation refusal as one readable line; any other message as it is.

    vLLM answers a body its schema refuses with a 400 whose message is pydantic's error list,
    one Python dict per line (vllm/entrypoints/serve/exception_handling/handlers/validation.py):
    ``2 validation errors:\\n  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should
    be a valid string', ...}\\n  {'type': 'too_long', 'loc': 'body.stop', 'msg': 'List should
    have at most 4 items after validation, not 5', ...}``. That becomes ``stop: List should have
    at most 4 items after validation, not 5``: one message per field, ``; ``-joined. A field of
    several types gets one error per type; those saying the value is not of that type (a
    ``*_type`` error) give way to the one about the type the value has.
    """
    if not _VALIDATION_HEAD.match(message):
        return message
    by_loc: dict[str, list[tuple[str, str]]] = {}
    for line in message.splitlines()[1:]:
        fields: dict[str, str] = {}
        for key, literal in _ERROR_FIELD.findall(line):
            if key not in fields:  # the first is the error's own; later ones may sit in its input
                try:
                    fields[key] = str(ast.literal_eval(literal))
                except (ValueError, SyntaxError):
                    return message
        if "msg" in fields:
            by_loc.setdefault(fields.get("loc", ""), []).append((fields.get("type", ""), fields["msg"]))
    if not by_loc:
        return message
    parts = []
    for loc, errors in by_loc.items():
        msg = next((m for t, m in errors if not t.endswith("_type")), errors[0][1])
        field = "" if loc == "body" else loc.removeprefix("body.")
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts)
