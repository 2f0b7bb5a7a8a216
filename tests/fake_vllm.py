"""A fake vLLM OpenAI server for unit and fault tests.

It answers with vLLM 0.32's exact response shapes (checked against real captures
in tests/golden/: chunk by chunk, the same keys, nulls and ordering of events),
streaming and not, including what the tiny random test model cannot show:
tool calls, reasoning ("thinking"), logprobs, and failures (an error before the
stream, an error event mid-stream, a connection cut mid-stream, a generation so
slow that a test can hang up on it and check that the fake saw the disconnect).

It is a plain ASGI app served by uvicorn on a thread, so the code under test
talks real HTTP to it. Tests script the next answers with ``fake.push(...)``;
without a script, a generation answers "w0 w1 …" with one token per word,
honouring ``max_tokens`` (finish ``length``) or stopping after `DEFAULT_TOKENS`.
Every request is recorded (``fake.requests``) so tests can assert on the exact
body the router sent. With ``max_model_len`` set, a generation whose prompt (one
token per word, plus one) does not leave room for a token is refused with vLLM's
400 and its words, ``max_tokens`` is cut to the room left, as vLLM does, and
/tokenize counts the same way.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn

DEFAULT_TOKENS = 3
FINGERPRINT = "vllm-0.32.0-fake"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Script:
    """One scripted answer (see the helpers below for the common ones)."""

    tokens: list[str] | None = None
    """Content tokens, one per chunk; None = the default generation."""
    reasoning: list[str] = field(default_factory=list)
    """Reasoning tokens sent before the content (vLLM's ``delta.reasoning``)."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """``{"name", "arguments": str, "id"?}``: streamed as vLLM's hermes parser does."""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    logprobs: bool = False
    status: int = 200
    error: str | None = None
    """With status >= 400: an error body before anything else."""
    error_after: int | None = None
    """Streaming: after this many content chunks, an error event instead of the rest."""
    cut_after: int | None = None
    """Streaming: after this many content chunks, close the connection (no [DONE])."""
    delay: float = 0.0
    """Seconds between chunks."""
    embedding: list[list[float]] | None = None
    metrics: dict[str, Any] | None = None
    """vLLM's per-request timings (``--enable-per-request-metrics``): on the usage chunk, or the whole body."""


def text(*tokens: str, finish: str = "stop", **kw: Any) -> Script:
    return Script(tokens=list(tokens), finish_reason=finish, **kw)


def tool_calls(*calls: dict[str, Any], content: list[str] | None = None) -> Script:
    return Script(tokens=content or [], tool_calls=list(calls), finish_reason="tool_calls")


def thinking(reasoning: list[str], content: list[str]) -> Script:
    return Script(tokens=content, reasoning=reasoning, finish_reason="stop")


def error(status: int, message: str) -> Script:
    return Script(status=status, error=message)


def slow(n: int, delay: float) -> Script:
    return Script(tokens=[f"t{i} " for i in range(n)], finish_reason="length", delay=delay)


class FakeVLLM:
    """A fake vLLM OpenAI server on 127.0.0.1 (``start()`` / ``stop()``, or a context manager)."""

    def __init__(self, model: str = "fake:latest", port: int | None = None, names: tuple[str, ...] = (),
                 max_model_len: int | None = None) -> None:
        self.model = model
        self.max_model_len = self._max_model_len = max_model_len
        """The context length to enforce (None: none; /v1/models and /tokenize then say 1024)."""
        self.names = {model, *names}
        """Every served name it answers to (several registry entries may point at one fake)."""
        self.port = port or _free_port()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.scripts: deque[Script] = deque()
        self.disconnects = 0
        """Streams the client hung up on before the end."""
        self.running = 0
        """Generations in progress (vLLM's ``vllm:num_requests_running``)."""
        self.healthy = True
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # --- control ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    def reset(self) -> None:
        self.requests.clear()
        self.scripts.clear()
        self.disconnects = 0
        self.healthy = True
        self.max_model_len = self._max_model_len

    def last(self, path: str | None = None) -> dict[str, Any]:
        """The body of the last request (to `path`)."""
        for p, body in reversed(self.requests):
            if path is None or p == path:
                return body
        raise AssertionError(f"no request to {path}")

    def start(self) -> FakeVLLM:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-vllm", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake vLLM did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        if method == "GET" and path == "/health":
            return await self._json(send, 200 if self.healthy else 503, {} if self.healthy else {"error": "dead"})
        if method == "GET" and path == "/v1/models":
            return await self._json(send, 200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                 "root": "/models/fake", "parent": None, "max_model_len": self.max_model_len or 1024}
                for name in sorted(self.names)]})
        if method == "GET" and path == "/metrics":
            text = f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} {float(self.running)}\n'
            return await self._raw(send, 200, text.encode(), b"text/plain")
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            return await self._json(send, 400, _error_body("JSON decode error", "Bad Request", 400))
        self.requests.append((path, req))
        if req.get("model") not in (None, *self.names):
            return await self._json(send, 404, _error_body(
                f"The model `{req.get('model')}` does not exist. Valid aliases: {self.model}.", "NotFoundError", 404,
                "model"))
        if path in ("/v1/chat/completions", "/v1/completions"):
            refusal = self._too_long(req)
            if refusal is not None:  # vLLM refuses it while rendering: no script is used up
                return await self._json(send, 400, refusal)
        script = self.scripts.popleft() if self.scripts else Script()
        if script.status >= 400:
            return await self._json(send, script.status, _error_body(
                script.error or "error", "BadRequestError" if script.status < 500 else "InternalServerError",
                script.status))
        if path == "/v1/chat/completions":
            return await self._generate(send, receive, req, script, chat=True)
        if path == "/v1/completions":
            return await self._generate(send, receive, req, script, chat=False)
        if path == "/v1/embeddings":
            return await self._json(send, 200, self._embeddings(req, script))
        if path == "/tokenize":
            tokens = [1] + [100 + i for i in range(len(_prompt_words(req)))]
            return await self._json(send, 200, {"count": len(tokens), "max_model_len": self.max_model_len or 1024,
                                                "tokens": tokens, "token_strs": None})
        if path == "/v1/messages":
            return await self._anthropic(send, req)
        return await self._json(send, 404, {"detail": "Not Found"})

    async def _raw(self, send: Any, status: int, body: bytes, ctype: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _json(self, send: Any, status: int, obj: Any) -> None:
        await self._raw(send, status, json.dumps(obj).encode(), b"application/json")

    # --- generation ---------------------------------------------------------------------

    def _too_long(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """vLLM 0.32's refusal of a prompt that leaves no room for a token (None if it fits)."""
        limit = self.max_model_len
        if limit is None:
            return None
        n = len(_prompt_words(req)) + 1
        if n > limit:  # renderers/params.py, _token_len_check
            return _error_body(f"This model's maximum context length is {limit} tokens. However, your prompt "
                               f"contains {n} input tokens, which exceeds this limit even without any output "
                               f"tokens. Please reduce the length of the input prompt. "
                               f"(parameter=input_tokens, value={n})", "BadRequestError", 400, "input_tokens")
        if n == limit:  # get_max_tokens leaves 0, which SamplingParams refuses
            return _error_body("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                               "BadRequestError", 400, "max_tokens")
        return None

    def _plan(self, req: dict[str, Any], script: Script) -> tuple[list[str], str]:
        if script.tokens is not None:
            return script.tokens, script.finish_reason or "stop"
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
        n = max_tokens or DEFAULT_TOKENS
        cut = bool(max_tokens)
        if self.max_model_len is not None:  # vLLM cuts max_tokens to the room the prompt leaves
            room = self.max_model_len - len(_prompt_words(req)) - 1
            if n >= room:
                n, cut = room, True
        tokens = [f"w{i} " for i in range(n)]
        for stop in req.get("stop") or ():
            for i, tok in enumerate(tokens):
                if stop.strip() and stop.strip() == tok.strip():
                    return tokens[:i], "stop"
        return tokens, "length" if cut else "stop"

    async def _generate(self, send: Any, receive: Any, req: dict[str, Any], script: Script, chat: bool) -> None:
        tokens, finish = self._plan(req, script)
        prompt_tokens = script.prompt_tokens if script.prompt_tokens is not None else len(_prompt_words(req)) + 1
        completion = len(tokens) + len(script.reasoning) + (8 * len(script.tool_calls))
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion,
                 "completion_tokens": completion}
        want_ids = bool(req.get("return_token_ids"))
        prompt_ids = list(range(1, prompt_tokens + 1)) if want_ids else None
        self.running += 1
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.ensure_future(watch())
        if not req.get("stream"):
            try:
                if script.delay:
                    try:
                        await asyncio.wait_for(gone.wait(), script.delay * len(tokens))
                    except TimeoutError:
                        pass
                    if gone.is_set():
                        self.disconnects += 1
                        return
                return await self._json(send, 200, self._whole(req, script, tokens, finish, usage, prompt_ids, chat))
            finally:
                watcher.cancel()
                self.running -= 1
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            for n, event in enumerate(self._events(req, script, tokens, finish, usage, prompt_ids, chat)):
                if event == "CUT":
                    return  # ends the response without its terminating chunk: the client sees a cut
                if script.delay and n:
                    try:
                        await asyncio.wait_for(gone.wait(), script.delay)
                    except TimeoutError:
                        pass
                if gone.is_set():
                    self.disconnects += 1
                    return
                await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()
            self.running -= 1

    def _events(self, req: dict[str, Any], script: Script, tokens: list[str], finish: str, usage: dict[str, Any],
                prompt_ids: list[int] | None, chat: bool) -> Any:
        cid = f"chatcmpl-{uuid.uuid4().hex[:16]}" if chat else f"cmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        want_ids = prompt_ids is not None
        head = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": req.get("model") or self.model}

        def dump(obj: dict[str, Any]) -> bytes:
            return json.dumps(obj, ensure_ascii=False).encode()

        if chat:
            yield dump({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}],
                        "prompt_token_ids": prompt_ids, "prompt_text": None})
        for r in script.reasoning:
            yield dump({**head, "choices": [{"index": 0, "delta": {"reasoning": r}, "logprobs": None,
                                             "finish_reason": None, "token_ids": None}]})
        last = len(tokens) - 1
        for i, tok in enumerate(tokens):
            if script.error_after is not None and i == script.error_after:
                yield dump(_error_body("the engine died", "InternalServerError", 500))
                return
            if script.cut_after is not None and i == script.cut_after:
                yield "CUT"
                return
            final = i == last and not script.tool_calls
            ids = [200 + i] if want_ids else None
            if chat:
                choice: dict[str, Any] = {"index": 0, "delta": {"content": tok},
                                          "logprobs": _chat_logprobs([tok]) if script.logprobs else None,
                                          "finish_reason": finish if final else None}
            else:
                choice = {"index": 0, "text": tok,
                          "logprobs": _completion_logprobs([tok], i) if script.logprobs else None,
                          "finish_reason": finish if final else None, "stop_reason": None,
                          "prompt_token_ids": prompt_ids if i == 0 else None}
            if final:
                choice["stop_reason"] = None
            choice["token_ids"] = ids
            yield dump({**head, "choices": [choice]})
        for n, call in enumerate(script.tool_calls):
            yield dump({**head, "choices": [{"index": 0, "delta": {"content": None, "tool_calls": [
                {"id": call.get("id") or f"chatcmpl-tool-{uuid.uuid4().hex[:16]}", "type": "function",
                 "index": n, "function": {"name": call["name"]}}]}, "logprobs": None, "finish_reason": None,
                "token_ids": None}]})
            args = call.get("arguments", "{}")
            for piece in [args[k:k + 3] for k in range(0, len(args), 3)]:
                yield dump({**head, "choices": [{"index": 0, "delta": {"content": None, "tool_calls": [
                    {"index": n, "function": {"arguments": piece}}]}, "logprobs": None, "finish_reason": None,
                    "token_ids": None}]})
        if script.tool_calls or not tokens:
            yield dump({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish,
                                             "stop_reason": None, "token_ids": None}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            last_chunk: dict[str, Any] = {**head, "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT}
            if script.metrics is not None:
                last_chunk["metrics"] = script.metrics
            yield dump(last_chunk)

    def _whole(self, req: dict[str, Any], script: Script, tokens: list[str], finish: str, usage: dict[str, Any],
               prompt_ids: list[int] | None, chat: bool) -> dict[str, Any]:
        want_ids = prompt_ids is not None
        full_usage = {**usage, "prompt_tokens_details": None, "completion_tokens_details": None}
        if not chat:
            return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion", "created": int(time.time()),
                    "model": req.get("model") or self.model, "choices": [{
                        "index": 0, "text": "".join(tokens),
                        "logprobs": _completion_logprobs(tokens, 0) if script.logprobs else None,
                        "finish_reason": finish, "stop_reason": None,
                        "token_ids": [200 + i for i in range(len(tokens))] if want_ids else None,
                        "prompt_logprobs": None, "prompt_token_ids": prompt_ids, "routed_experts": None}],
                    "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": full_usage,
                    "kv_transfer_params": None, "ec_transfer_params": None, "metrics": script.metrics}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens) if tokens or not script.tool_calls
                                   else None, "refusal": None, "annotations": None, "audio": None,
                                   "function_call": None}
        if script.tool_calls:
            message["tool_calls"] = [
                {"id": c.get("id") or f"chatcmpl-tool-{uuid.uuid4().hex[:16]}", "type": "function",
                 "function": {"name": c["name"], "arguments": c.get("arguments", "{}")}} for c in script.tool_calls]
        message["reasoning"] = "".join(script.reasoning) or None
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.get("model") or self.model, "choices": [{
                    "index": 0, "message": message, "logprobs": _chat_logprobs(tokens) if script.logprobs else None,
                    "finish_reason": finish, "stop_reason": None,
                    "token_ids": [200 + i for i in range(len(tokens))] if want_ids else None,
                    "routed_experts": None}],
                "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": full_usage,
                "prompt_logprobs": None, "prompt_token_ids": prompt_ids, "prompt_text": None,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": script.metrics}

    def _embeddings(self, req: dict[str, Any], script: Script) -> dict[str, Any]:
        inputs = req.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        vectors = script.embedding or [[float(len(s) % 7 + 1), 2.0, 2.0, 1.0] for s in inputs]
        n_tokens = sum(len(str(s).split()) + 1 for s in inputs)
        return {"id": f"embd-{uuid.uuid4().hex[:16]}", "object": "list", "created": int(time.time()),
                "model": self.model,
                "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0,
                          "prompt_tokens_details": None}}

    async def _anthropic(self, send: Any, req: dict[str, Any]) -> None:
        await self._json(send, 200, {
            "id": f"msg_{uuid.uuid4().hex[:16]}", "type": "message", "role": "assistant", "model": self.model,
            "content": [{"type": "text", "text": "w0 w1"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 2}})


def _prompt_words(req: dict[str, Any]) -> list[str]:
    if "messages" in req:
        words: list[str] = []
        for m in req["messages"]:
            c = m.get("content")
            if isinstance(c, str):
                words += c.split()
            elif isinstance(c, list):
                words += [w for part in c if part.get("type") == "text" for w in part["text"].split()]
        return words
    prompt = req.get("prompt")
    if isinstance(prompt, list):
        return [str(t) for t in prompt]
    return str(prompt or "").split()


def _error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _chat_logprobs(tokens: list[str]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": -1.5, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": t, "logprob": -1.5, "bytes": list(t.encode())},
                                          {"token": "x", "logprob": -2.5, "bytes": [120]}]} for t in tokens]}


def _completion_logprobs(tokens: list[str], offset: int) -> dict[str, Any]:
    return {"text_offset": list(range(offset, offset + len(tokens))), "token_logprobs": [-1.5] * len(tokens),
            "tokens": tokens, "top_logprobs": [{t: -1.5, "x": -2.5} for t in tokens]}


class RouterThread:
    """vLLama's app (the real service, fleet and upstream) on its own thread and event loop.

    `registry` is models.yaml's content; models with a ``url`` (e.g. a FakeVLLM's)
    need no supervisord. Tests talk to it over real HTTP with any client.
    """

    def __init__(self, registry: dict[str, Any], port: int | None = None) -> None:
        self.registry = registry
        self.port = port or _free_port()
        self.fleet: Any = None
        self.service: Any = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        from router.app import create_app
        from router.catalog import Catalog
        from router.config import parse
        from router.lifecycle import Fleet
        from router.service import OllamaService
        from router.upstream import Upstream

        self._loop = asyncio.get_running_loop()
        config = parse(self.registry)
        upstream = Upstream()
        self.fleet = Fleet(config, None, upstream)
        self.service = OllamaService(self.fleet, upstream)
        app = create_app(self.service, Catalog(config))
        await self.fleet.start()
        await self.fleet.refresh()
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off", access_log=False))
        try:
            await self._server.serve()
        finally:
            await self.fleet.close()
            await upstream.aclose()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run `coro` on the router's loop (to look at or poke the fleet)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> RouterThread:
        self._thread = threading.Thread(target=self._run, name="vllama-router", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while self._server is None or not self._server.started:
            if self._error is not None:
                raise RuntimeError(f"router did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("router did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
