"""The admin API under ``/vllama``: what the CLI (`vllama ps`, `logs`, `start` …) talks to.

Status is read from the fleet (states fed by supervisord and ``/health``) and,
per request, from each vLLM's ``/metrics`` for its running and waiting
requests, so `vllama ps` shows the engine's own queue next to the router's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar import MediaType, Request, Response, Router, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Stream

from . import hub, supervisor, wire
from .lifecycle import Fleet, ModelNotFound, Runtime, State
from .service import ApiError

_encode = msgspec.json.Encoder().encode

#: (used bytes, budget bytes or None, devices) for a runtime; see `memory_usage`.
Usage = Callable[[Runtime], tuple[int | None, int | None, list[str]]]


class ModelStatus(msgspec.Struct):
    """One model as `vllama ps --json` shows it; every key always present."""

    name: str
    state: str
    reason: str
    since: float
    load: str
    aliases: list[str] = []
    uptime: float | None = None
    port: int | None = None
    pid: int | None = None
    url: str | None = None
    restarts: int = 0
    inflight: int = 0
    queued: int = 0
    vllm_running: int | None = None
    vllm_waiting: int | None = None
    devices: list[str] = []
    memory_used: int | None = None
    memory_budget: int | None = None
    overrun: bool = False
    expires_at: float | None = None
    change: str | None = None
    """A saved change of the model that does not serve yet: "starting" (its new server starts
    beside the serving one) or "failed" (it did not start; the previous configuration serves)."""
    change_error: str | None = None
    """Why that change did not start (the error at the end of its vLLM log when there is one)."""
    log_tail: list[str] = []


def _metric(text: str, name: str) -> int | None:
    """Sum of a vLLM gauge over its label sets (one model per server, so one line)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                pass
    return int(total) if seen else None


async def _engine_queue(fleet: Fleet, rt: Runtime) -> tuple[int | None, int | None]:
    if rt.state not in (State.READY, State.UNHEALTHY):
        return None, None
    try:
        r = await fleet.upstream.get(rt.base_url, "/metrics", timeout=2.0)
    except httpx.HTTPError:
        return None, None
    return _metric(r.text, "vllm:num_requests_running"), _metric(r.text, "vllm:num_requests_waiting")


def _no_usage(_: Runtime) -> tuple[int | None, int | None, list[str]]:
    return None, None, []


async def model_status(fleet: Fleet, rt: Runtime, usage: Usage = _no_usage, *, tail: bool = False) -> ModelStatus:
    running, waiting = await _engine_queue(fleet, rt)
    used, budget, devices = usage(rt)
    note = rt.change_note
    return ModelStatus(
        name=rt.name,
        state=rt.state.value,
        reason=f"{rt.reason}; {note}" if note else rt.reason,
        since=rt.since,
        load=rt.model.load,
        aliases=list(rt.model.aliases),
        uptime=time.time() - rt.started_at if rt.started_at else None,
        port=rt.port,
        pid=rt.pid,
        url=rt.model.url,
        restarts=rt.restarts,
        inflight=rt.inflight,
        queued=rt.waiting,
        vllm_running=running,
        vllm_waiting=waiting,
        devices=devices,
        memory_used=used,
        memory_budget=budget,
        overrun=bool(used and budget and used > budget),
        expires_at=None if rt.expires_at is None or math.isinf(rt.expires_at) else rt.expires_at,
        change=_change(rt),
        change_error=rt.pending_error,
        log_tail=fleet.log_tail(rt) if tail else [],
    )


def _change(rt: Runtime) -> str | None:
    """`ModelStatus.change` of `rt`."""
    if rt.pending is None:
        return None
    return "starting" if rt.pending_error is None else "failed"


async def _pull_unless_gone(request: Request[Any, Any, Any], events: AsyncIterator[Any]) -> None:
    """Run a non-streamed pull to its end, unless the client goes away first: then close `events`,
    which cancels the download (partial files stay), as a streamed pull does and as Ollama does
    (its pull runs on the request's context). Raises the pull's PullError."""

    async def drain() -> None:
        async for _ in events:
            pass

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    pulling, watching = asyncio.ensure_future(drain()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({pulling, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        pulling.cancel()
        await asyncio.gather(pulling, watching, return_exceptions=True)
    if pulling.cancelled():
        raise ApiError(499, "client went away; pull again to resume")
    pulling.result()


#: States in which a model's vLLM holds no files of the cache open, nor will until started again.
_IDLE = (State.STOPPED, State.FAILED, State.MISSING)


def _busy_with(fleet: Fleet, repo: str, revision: str | None) -> list[Runtime]:
    """The models serving `repo` at `revision`'s snapshot that are not stopped: whichever name the
    client deletes by (a registry name, its repo id, another entry with the same source), these
    would lose their files under them and come back `missing` or download everything again."""
    busy = []
    for rt in fleet.runtimes.values():
        ref = hub.source_ref(rt.model)
        if ref is not None and ref[0] == repo and rt.state not in _IDLE and hub.same_snapshot(repo, ref[1], revision):
            busy.append(rt)
    return busy


def _refuse_while_served(fleet: Fleet, repo: str, revision: str | None, asked: str | None) -> None:
    """409 while a model serves these files; `asked` is the registry name the client sent, if any."""
    busy = sorted(_busy_with(fleet, repo, revision), key=lambda rt: rt.name != asked)  # the one asked for first
    if not busy:
        return
    rt = busy[0]
    what = f'model "{rt.name}" is' if rt.name == asked else f'model "{rt.name}" serves {repo} and is'
    raise ApiError(409, f"{what} {rt.state.value}; stop it first (`vllama stop {rt.name}`)")


def _pull_lines(events: AsyncIterator[dict[str, Any]]) -> Stream:
    """Ollama's streamed /api/pull: one JSON object a line."""
    return Stream((_encode(ev) + b"\n" async for ev in events), media_type="application/x-ndjson")


async def _already_here() -> AsyncIterator[dict[str, Any]]:
    """What a streamed pull of a local-directory model says: nothing to fetch, so the manifest
    step and success, the first and last lines of every Ollama pull."""
    yield hub.ollama_status(hub.Progress("manifest"))
    yield hub.ollama_status(hub.Progress("success"))


def library_routes(fleet: Fleet) -> list[Any]:
    """``/api/pull`` and ``/api/delete``: the HF cache vLLM reads, in Ollama's shapes.

    No server path goes into their errors (the client may be anywhere); `vllama rm` with no
    server running says where the cache is, on its own machine."""

    @post("/api/pull", status_code=200)
    async def pull(data: JSONBody[wire.ModelRequest], request: Request[Any, Any, Any]) -> Response[Any] | Stream:
        name = data.target
        if not name:
            raise ApiError(400, "model is required")
        try:
            target = hub.resolve_target(name, fleet.config)
        except hub.PullError as e:
            raise ApiError(e.status, e.message) from None
        if target.local_dir is not None:
            if not Path(target.local_dir).is_dir():
                raise ApiError(404, f'model "{target.model}" is served from a local directory that does not exist '
                                    "(its source in models.yaml)")
            if data.stream is not False:
                return _pull_lines(_already_here())
            return Response({"status": "success"})
        if data.stream is not False:
            return _pull_lines(hub.pull_events(target.repo, target.revision))
        try:
            await _pull_unless_gone(request, hub.pull_events(target.repo, target.revision, raise_errors=True))
        except hub.PullError as e:
            raise ApiError(e.status, e.message) from None
        return Response({"status": "success"})

    @delete("/api/delete", status_code=200)
    async def remove(data: JSONBody[wire.ModelRequest]) -> Response[bytes]:
        """200 with an empty body, as Ollama. 409 while any model serves the files (checked here)
        or while the repo is being pulled, by this server or by `vllama pull` in another process
        (hub.delete checks that under a lock file)."""
        name = data.target
        if not name:
            raise ApiError(400, "model is required")
        try:
            target = hub.delete_target(name, fleet.config)
        except hub.PullError as e:
            raise ApiError(e.status, e.message) from None
        if target.local_dir is not None:
            raise ApiError(400, f'model "{target.model}" is a local directory; vLLama does not delete it')
        _refuse_while_served(fleet, target.repo, target.revision, target.model)
        try:
            await asyncio.to_thread(hub.delete, target.repo, target.revision)
        except hub.PullError as e:
            err = hub.not_found(name) if e.status == 404 else e  # hub's 404 names the cache's path
            raise ApiError(err.status, err.message) from None
        return Response(b"", status_code=200, media_type=MediaType.TEXT)

    return [pull, remove]


def admin_router(fleet: Fleet, usage: Usage = _no_usage, *,
                 restart_needed: Callable[[], list[str]] = list) -> Router:
    """`restart_needed`: the server keys models.yaml changed that only a restart applies (serve's)."""

    def runtime(name: str) -> Runtime:
        try:
            return fleet.get(name)
        except ModelNotFound:
            raise ApiError(404, f"model '{name}' not found") from None  # Ollama's words

    def local(rt: Runtime) -> Runtime:
        if rt.remote:
            raise ApiError(400, f'model "{rt.name}" is served by {rt.model.url}; vLLama does not control it')
        return rt

    @get("/models")
    async def list_models() -> list[ModelStatus]:
        return list(await asyncio.gather(*(model_status(fleet, rt, usage) for rt in fleet.runtimes.values())))

    @get("/models/{name:str}")
    async def show_model(name: FromPath[str]) -> ModelStatus:
        return await model_status(fleet, runtime(name), usage, tail=True)

    @post("/models/{name:str}/start", status_code=202)
    async def start_model(name: FromPath[str]) -> ModelStatus:
        rt = local(runtime(name))
        await fleet.start_model(rt)
        return await model_status(fleet, rt, usage)

    @post("/models/{name:str}/stop", status_code=200)
    async def stop_model(name: FromPath[str]) -> ModelStatus:
        rt = local(runtime(name))
        await fleet.stop_model(rt, "stopped by admin", hold=True)
        return await model_status(fleet, rt, usage)

    @post("/models/{name:str}/restart", status_code=202)
    async def restart_model(name: FromPath[str]) -> ModelStatus:
        rt = local(runtime(name))
        await fleet.restart_model(rt)
        return await model_status(fleet, rt, usage)

    @get("/models/{name:str}/logs", media_type="text/plain")
    async def logs(name: FromPath[str], lines: FromQuery[int] = 100, follow: FromQuery[bool] = False) -> Stream:
        if lines < 0:
            raise ApiError(400, f"lines must be 0 or more, not {lines}")
        rt = local(runtime(name))
        path = fleet.log_path(rt)
        if path is None:
            raise ApiError(404, f'no log for model "{name}"')
        return Stream(_follow(path, min(lines, 10_000), follow), media_type="text/plain")

    @post("/reload", status_code=200)
    async def reload() -> dict[str, Any]:
        """Re-read models.yaml now (as saving it, SIGHUP or `vllama reload` do)."""
        result = await fleet.reload_file()
        if not result["applied"]:
            raise ApiError(400, result["error"])
        return result

    @get("/config")
    async def config_status() -> dict[str, Any]:
        """The file, the last rejected reload's error, the server keys waiting for a restart, and
        the models whose saved change did not start (their previous configuration serves on)."""
        return {"path": str(fleet.config.path), "reload_error": fleet.reload_error,
                "restart_needed": restart_needed(), "failed_changes": fleet.failed_changes()}

    return Router(path="/vllama", route_handlers=[list_models, show_model, start_model, stop_model,
                                                    restart_model, logs, reload, config_status])


def _read_range(path: Any, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


async def _follow(path: Any, lines: int, follow: bool) -> AsyncIterator[bytes]:
    """The last `lines` lines, then (with `follow`) whatever is appended, like ``tail -f``."""
    for line in supervisor.tail_file(path, lines, max_bytes=max(256 * 1024, lines * 400)):
        yield (line + "\n").encode()
    if not follow:
        return
    try:
        pos = path.stat().st_size
    except OSError:
        pos = 0
    while True:
        await asyncio.sleep(0.5)
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size < pos:  # rotated
            pos = 0
        if size > pos:
            data = await asyncio.to_thread(_read_range, path, pos, size)
            pos = size
            yield data
