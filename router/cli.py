"""The `vllama` command line: serve, check, and the dev helpers.

Commands that act on a running server talk to its HTTP API (the same routes
as any client); `serve` and `check` read the registry themselves.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__
from . import config as config_mod
from .units import human_bytes

CONFIG_HELP = "models.yaml to use (default: $VLLAMA_CONFIG, else configs/models.yaml)"


def _stderr() -> Console:
    """Where errors go. Soft-wrapped: rich wraps at 80 columns when stderr is not a terminal,
    which split one error over several lines (and a grep for it)."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _load(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        err = _stderr()
        err.print(f"[bold red]invalid registry[/] {escape(str(e.path or ''))}:")
        for p in e.problems:
            err.print(f"  - {p}", markup=False)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vllama")
def cli() -> None:
    """Serve several vLLM models behind the Ollama API."""


@cli.command()
@click.option("--config", "config_path", envvar="VLLAMA_CONFIG", help=CONFIG_HELP)
@click.option("--host", help="address to bind (default: server.host, 127.0.0.1)")
@click.option("--port", type=click.IntRange(1, 65535), help="port to bind (default: server.port, 11434)")
@click.option("--state-dir", type=click.Path(path_type=Path), help="runtime dir for supervisord, logs, pid files")
@click.option("--attach", is_flag=True, help="use the supervisord that runs vllama (see supervisord.conf)")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="the router's own log")
def serve(config_path: str | None, host: str | None, port: int | None, state_dir: Path | None,
          attach: bool, log_level: str) -> None:
    """Start supervisord, one vLLM server per model, and the Ollama API."""
    from . import serve as serve_mod

    cfg = _load(config_path)
    opts = serve_mod.Options(host=host, port=port, state_dir=state_dir, attach=attach, log_level=log_level)
    sys.exit(serve_mod.main(cfg, opts))


@cli.command()
@click.option("--config", "config_path", envvar="VLLAMA_CONFIG", help=CONFIG_HELP)
def check(config_path: str | None) -> None:
    """Validate models.yaml; exit non-zero listing every problem."""
    from . import gpu, placement
    from .lifecycle import Fleet

    cfg = _load(config_path)
    out = Console(soft_wrap=True)  # a long path must not fold the status line
    n = len(cfg.models)
    out.print(f"[green]valid[/] {escape(str(cfg.path))}: {n} model{'' if n == 1 else 's'}", highlight=False)
    try:
        inventory = gpu.detect(cfg.engine.device)
    except gpu.GpuUnavailable as e:
        _fail(str(e))
    facts = Fleet(cfg, None, None).model_dir  # type: ignore[arg-type]

    def model_facts(m: config_mod.Model) -> placement.ModelFacts | None:
        d = facts(m)
        return placement.ModelFacts.from_dir(d) if d is not None and d.is_dir() else None

    # `always` models are placed together at boot; each on-demand one must fit beside them
    # (evicting other idle on-demand models when it starts).
    always = [m for m in cfg.models if m.load == "always"]
    share = placement.cpu_models(cfg)
    plan = placement.plan(always, inventory, reserve_gb=cfg.server.reserve_gb, facts=model_facts, cpu_models=share)
    # Each on-demand one alone beside them (remote ones too: their row says "remote"), so that
    # the table lists every model of the registry, not only those placed at boot.
    on_demand = {m.name: placement.plan([m], inventory, reserve_gb=cfg.server.reserve_gb, running=plan.placements,
                                        facts=model_facts, cpu_models=share)
                 for m in cfg.models if m.load == "on_demand"}
    problems = list(plan.problems)
    for alone in on_demand.values():
        problems += [f"{p} (on demand)" for p in alone.problems]
    if out.is_terminal:
        out.print(placement.render_plan_table(plan, on_demand))
    else:  # piped: plain text wide enough not to fold every row at 80 columns
        click.echo(placement.format_plan(plan, on_demand=on_demand), nl=False)
    if problems:
        err = _stderr()
        err.print("[bold red]the plan does not fit:[/]")
        for p in problems:
            err.print(f"  - {p}", markup=False)
        sys.exit(1)


# --- commands that talk to a running server ----------------------------------------


DEFAULT_PORT = 11434
QUERY_TIMEOUT = 30.0
"""Seconds a query to the server may take (see `Api.request`)."""


def _base_url(host: str | None) -> str:
    """Like OLLAMA_HOST: `host[:port]`, `[v6]:port` or a URL (with a path, behind a proxy); the
    port defaults to 11434 even in a URL. Raises ValueError for what httpx could not connect to,
    so that a typo is one line, not a traceback."""
    given = (host or os.environ.get("VLLAMA_HOST") or os.environ.get("OLLAMA_HOST") or "").strip()
    scheme, sep, rest = given.partition("://")
    if not sep:
        scheme, rest = "http", given
    hostport, _, path = rest.partition("/")
    hostport = hostport or "127.0.0.1"
    if hostport.count(":") > 1 and not hostport.startswith("["):  # a bare IPv6 address
        hostport = f"[{hostport}]"
    has_port = "]:" in hostport if hostport.startswith("[") else ":" in hostport
    if not has_port:
        hostport += f":{DEFAULT_PORT}"
    url = f"{scheme.lower()}://{hostport}" + (f"/{path.strip('/')}" if path.strip("/") else "")
    problem = None
    if scheme.lower() not in ("http", "https"):
        problem = "only http:// and https:// are served"
    else:
        try:
            if not httpx.URL(url).host:
                problem = "no host"
        except httpx.InvalidURL as e:
            problem = str(e)
    if problem:
        raise ValueError(f"invalid server address {given!r}: {problem} (--host or $VLLAMA_HOST)")
    return url


class Api:
    """The running router's HTTP API, with errors turned into one clear line."""

    def __init__(self, host: str | None) -> None:
        try:
            self.base = _base_url(host)
        except ValueError as e:
            _fail(str(e))
        key = os.environ.get("VLLAMA_API_KEY")
        self.client = httpx.Client(base_url=self.base, timeout=httpx.Timeout(30.0, read=None),
                                   headers={"Authorization": f"Bearer {key}"} if key else None)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A GET (a query: `ps`, `list`, a status poll) must answer within QUERY_TIMEOUT, so a
        hung server is an error line, not a hung command; an action (stop, reload) may wait for
        a drain or a vLLM's stop as long as the server takes."""
        if method == "GET":
            kw.setdefault("timeout", QUERY_TIMEOUT)
        with self._errors():
            r = self.client.request(method, path, **kw)
        _check(r)
        return r

    @contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """The response, its body read in the `with` block: a connection lost mid-body (the
        server stopped during `logs -f` or an answer) is one error line too, not a traceback."""
        with self._errors(), self.client.stream(method, path, **kw) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            yield r

    def reachable(self) -> bool:
        """False when nothing listens at the address; any other failure exits with its error."""
        try:
            self.client.get("/")
        except httpx.ConnectError:
            return False
        except httpx.TransportError as e:
            self._transport_error(e)
        return True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as e:
            self._transport_error(e)

    def _transport_error(self, e: httpx.TransportError) -> NoReturn:
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            _fail(f"cannot reach vllama at {self.base}: is `vllama serve` running? (--host or $VLLAMA_HOST)")
        if isinstance(e, httpx.TimeoutException):
            _fail(f"vllama at {self.base} did not answer in time")
        _fail(f"connection to vllama at {self.base} lost: {e or type(e).__name__}")


def _error_message(r: httpx.Response) -> str:
    """The server's `{"error": "..."}` (Ollama's shape; OpenAI's `{"error": {"message"}}` from
    the pass-through), else the start of whatever came (a proxy's page), else the status's name."""
    try:
        body = r.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        return error
    return " ".join(r.text.split())[:200] or r.reason_phrase or "no details"


def _check(r: httpx.Response) -> None:
    """Exit with the server's own message on an HTTP error."""
    if r.status_code < 400:
        return
    message = f"{_error_message(r)} (HTTP {r.status_code})"
    if r.status_code == 401:
        message += "; $VLLAMA_API_KEY is the key the CLI sends"
    _fail(message)


def _fail(message: str, code: int = 1, *, json_error: bool = True) -> NoReturn:
    """One `error: ...` line on stderr, printed as is (a model name or vLLM message may hold
    `[/...]`, which rich took for markup and died on), then exit `code`. A command run with
    --json also prints ``{"error": "..."}`` on stdout (unless it printed its JSON already,
    `json_error` false): a script reading its JSON gets JSON."""
    ctx = click.get_current_context(silent=True)
    if json_error and ctx is not None and ctx.params.get("as_json"):
        click.echo(json.dumps({"error": message}))
    _stderr().print(f"[bold red]error:[/] {escape(message)}")
    sys.exit(code)


def _size(n: int | None) -> str:
    """Bytes for `ps` and `list` in the units `pull` and `rm` print: whole-GiB figures left a
    3.4 MB model at "0.0 GiB"."""
    return "-" if n is None else human_bytes(n)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    return f"{m}m{s % 60}s" if m else f"{s}s"


STATE_STYLE = {"ready": "green", "starting": "yellow", "restarting": "yellow", "unhealthy": "magenta",
               "stopping": "yellow", "failed": "bold red", "stopped": "dim", "missing": "red"}

host_option = click.option("--host", envvar="VLLAMA_HOST",
                           help="vllama server (default 127.0.0.1:11434); $VLLAMA_API_KEY is sent as its key")
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


def _table(title: str, columns: list[str], rows: list[list[str]], styles: list[str | None] | None = None) -> None:
    """A rich table on a terminal; tab-separated plain text when piped. Cells are text, not
    markup: a reason such as `[Errno 98] ... [/opt/vllm]` is shown as it is.

    On a narrow terminal the first two columns (the name, and the state or ID) keep their
    width and the others give way (the last, free text, wraps): squeezing every column alike
    cut `ps` on 80 columns down to `plai…` and no STATE at all.
    """
    out = Console()
    if not out.is_terminal:
        click.echo("\t".join(columns))
        for r in rows:
            click.echo("\t".join(r))
        return
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for i, c in enumerate(columns):
        widest = max([len(c), *(len(r[i]) for r in rows)])
        t.add_column(c, no_wrap=i < len(columns) - 1, min_width=widest if i < 2 else None)
    for i, r in enumerate(rows):
        t.add_row(*(Text(c) for c in r), style=(styles[i] if styles else None))
    out.print(t)


@cli.command()
@host_option
@json_option
def ps(host: str | None, as_json: bool) -> None:
    """Every model: state, uptime, port, PID, memory vs budget, requests, restarts."""
    api = Api(host)
    models = api.request("GET", "/vllama/models").json()
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    state = api.request("GET", "/vllama/config").json()
    reload_error = state.get("reload_error")
    if reload_error:
        _stderr().print(f"[bold red]last reload rejected[/] (still serving the previous registry): "
                        f"{escape(reload_error)}")
    restart = state.get("restart_needed")
    if restart:
        _stderr().print(f"[bold yellow]restart needed[/] for models.yaml's {escape(', '.join(restart))} "
                        "(serving with the values `vllama serve` started with)")
    for name, error in (state.get("failed_changes") or {}).items():
        _stderr().print(f"[bold red]saved change did not start[/] for {escape(name)} (still serving its previous "
                        f"configuration; `vllama reload` or `vllama restart {escape(name)}` tries it again): "
                        f"{escape(error)}")
    rows, styles = [], []
    for m in models:
        mem = f"{_size(m.get('memory_used'))} / {_size(m.get('memory_budget'))}"
        if m.get("overrun"):
            mem += " OVER"
        reqs = f"{m.get('vllm_running', '-') if m.get('vllm_running') is not None else '-'}/" \
               f"{m.get('vllm_waiting') if m.get('vllm_waiting') is not None else '-'}"
        rows.append([m["name"], m["state"], _ago(m.get("uptime")), str(m.get("port") or m.get("url") or "-"),
                     str(m.get("pid") or "-"), ",".join(m.get("devices", [])) or "-", mem, reqs,
                     str(m.get("queued", 0)), str(m.get("restarts", 0)), m.get("reason", "")])
        styles.append(STATE_STYLE.get(m["state"]))
    _table("models", ["NAME", "STATE", "UPTIME", "PORT", "PID", "DEVICES", "MEMORY / BUDGET",
                      "RUN/WAIT", "QUEUED", "RESTARTS", "REASON"], rows, styles)


@cli.command("list")
@host_option
@json_option
def list_(host: str | None, as_json: bool) -> None:
    """The registry's models, with what is downloaded (like `ollama list`)."""
    models = Api(host).request("GET", "/api/tags").json()["models"]
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    rows = [[m["name"], (m.get("digest") or "")[:12], _size(m.get("size")) if m.get("size") else "-",
             m.get("download", ""), _local_time(m.get("modified_at") or "")] for m in models]
    _table("registry", ["NAME", "ID", "SIZE", "FILES", "MODIFIED"], rows)


def _local_time(iso: str) -> str:
    """The server's ISO time (UTC) as local `YYYY-MM-DD HH:MM:SS`: cutting the string showed
    UTC with nothing to say so."""
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso[:19].replace("T", " ")
    return (t.astimezone() if t.tzinfo else t).strftime("%Y-%m-%d %H:%M:%S")


@cli.command()
@click.argument("model")
@click.option("-n", "--lines", default=100, show_default=True, help="lines from the end")
@click.option("-f", "--follow", is_flag=True, help="keep printing what the model logs")
@host_option
def logs(model: str, lines: int, follow: bool, host: str | None) -> None:
    """The model's vLLM log."""
    if lines < 0:
        _fail(f"--lines must be 0 or more, not {lines}")
    api = Api(host)
    try:
        with api.stream("GET", f"/vllama/models/{model}/logs", params={"lines": lines, "follow": follow}) as r:
            for chunk in r.iter_bytes():
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass  # how `logs -f` ends


WAIT_SECONDS = 900
SETTLED = ("ready", "failed", "missing", "stopped")
"""States a model stays in by itself: waiting for `ready` stops at any of them."""


def _control(action: str, model: str, host: str | None, as_json: bool, wait: bool) -> None:
    """Start, stop or restart; with `wait`, until the model settles. Non-zero unless it ends up
    where it was sent (a `missing` or `failed` model, or one still starting at the deadline)."""
    api = Api(host)
    status = api.request("POST", f"/vllama/models/{model}/{action}").json()
    deadline = time.monotonic() + WAIT_SECONDS
    while wait and status["state"] not in SETTLED and time.monotonic() < deadline:
        time.sleep(1)
        status = api.request("GET", f"/vllama/models/{model}").json()
    state, reason = status["state"], status.get("reason") or ""
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        Console(soft_wrap=True, highlight=False).print(Text.assemble(
            f"{status['name']}: ", (state, STATE_STYLE.get(state, "")), f" ({reason})" if reason else ""))
    if wait and state not in SETTLED:
        _fail(f"{status['name']} is still {state} after {WAIT_SECONDS // 60} minutes; `vllama ps` shows how it goes",
              json_error=False)  # --json printed the model's status
    if state in ("failed", "missing") or (wait and state != "ready"):
        sys.exit(1)


control_options = [click.argument("model"), host_option, json_option,
                   click.option("--no-wait", is_flag=True, help="return at once instead of waiting until ready")]
# `stop` returns once the model is stopped; --no-wait is accepted (scripts pass it) but not offered.
stop_options = [*control_options[:3], click.option("--no-wait", is_flag=True, hidden=True)]


def _with(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f
    return wrap


@cli.command()
@_with(control_options)
def start(model: str, host: str | None, as_json: bool, no_wait: bool) -> None:
    """Start a model (the others keep serving); waits until it is ready."""
    _control("start", model, host, as_json, wait=not no_wait)


@cli.command()
@_with(stop_options)
def stop(model: str, host: str | None, as_json: bool, no_wait: bool) -> None:
    """Stop a model (the others keep serving); requests no longer start it."""
    _control("stop", model, host, as_json, wait=False)


@cli.command()
@_with(control_options)
def restart(model: str, host: str | None, as_json: bool, no_wait: bool) -> None:
    """Restart a model (the others keep serving); waits until it is ready."""
    _control("restart", model, host, as_json, wait=not no_wait)


def _interactive() -> bool:
    """Whether a person types at stdin (a seam for tests, whose stdin never is a terminal)."""
    return sys.stdin.isatty()


@cli.command()
@click.argument("model")
@click.argument("prompt", required=False)
@host_option
def run(model: str, prompt: str | None, host: str | None) -> None:
    """Chat with a model, like `ollama run`: one prompt, or an interactive session."""
    api = Api(host)
    history: list[dict[str, str]] = []

    def ask(text: str) -> None:
        """One turn; it joins the history only once answered, so an interrupted one is forgotten."""
        turn = [*history, {"role": "user", "content": text}]
        reply = []
        with api.stream("POST", "/api/chat", json={"model": model, "messages": turn, "stream": True}) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                data = json.loads(line)
                if "error" in data:
                    _fail(str(data["error"]))
                piece = (data.get("message") or {}).get("content") or ""
                reply.append(piece)
                click.echo(piece, nl=False)
        click.echo()
        history.extend([turn[-1], {"role": "assistant", "content": "".join(reply)}])

    if prompt is not None:
        ask(prompt)
        return
    if not _interactive():
        ask(sys.stdin.read())
        return
    click.echo("Send a message (/bye to exit)")
    while True:
        try:
            text = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if text.strip() in ("/bye", "/exit"):
            return
        if text.strip():
            try:
                ask(text)
            except KeyboardInterrupt:
                click.echo()  # as in `ollama run`: Ctrl-C ends the answer, not the session


@cli.command()
@host_option
@json_option
def reload(host: str | None, as_json: bool) -> None:
    """Re-read models.yaml on the running server; only what changed is touched."""
    result = Api(host).request("POST", "/vllama/reload").json()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    changes = {k: v for k, v in result["changes"].items() if v and k != "unchanged"}
    if not changes:
        click.echo("reloaded: nothing changed")
    for kind, names in changes.items():
        click.echo(f"{kind}: {', '.join(names)}")


@cli.command()
@click.argument("name")
@click.option("--gguf", help="pull only this GGUF file of the repository")
@click.option("--config", "config_path", envvar="VLLAMA_CONFIG", help=CONFIG_HELP)
def pull(name: str, gguf: str | None, config_path: str | None) -> None:
    """Download a model into the Hugging Face cache vLLM reads.

    NAME is a model of the registry (its `source` is pulled) or a repo id
    (`org/name[@revision]`). Interrupted pulls (Ctrl-C) resume where they stopped.
    """
    from . import hub

    cfg, unreadable = None, None
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        unreadable = e  # a bare repo id needs no registry
    try:
        target = hub.resolve_target(name, cfg)
    except hub.PullError as e:
        if unreadable is None:
            _fail(e.message)
        # NAME may well be in the registry: say why it could not be looked up.
        _fail(f"{e.message}; the registry {unreadable.path or ''} could not be read: {'; '.join(unreadable.problems)}")
    if target.local_dir is not None:
        if not Path(target.local_dir).is_dir():
            _fail(f"{name} is served from the local directory {target.local_dir}, which does not exist")
        click.echo(f"{name} is served from the local directory {target.local_dir}: nothing to pull")
        return
    try:
        hub.render_pull(target.repo, target.revision, gguf, Console())
    except hub.PullError as e:
        _fail(e.message)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)  # 128 + SIGINT, as shells say


@cli.command()
@click.argument("name")
@host_option
@click.option("--config", "config_path", envvar="VLLAMA_CONFIG",
              help="models.yaml that names the model when no server is running " + CONFIG_HELP[CONFIG_HELP.index("("):])
def rm(name: str, host: str | None, config_path: str | None) -> None:
    """Remove a model's cached files (refused while the model is running)."""
    from . import hub

    api = Api(host)
    if api.reachable():
        api.request("DELETE", "/api/delete", json={"model": name})
        click.echo(f"deleted {name}")
        return
    # No server: nothing can be running from this cache through us.
    try:
        freed = hub.delete(*_cache_ref(name, config_path))
    except hub.PullError as e:
        _fail(e.message)
    click.echo(f"deleted {name} ({human_bytes(freed)} freed)")


def _cache_ref(name: str, config_path: str | None) -> tuple[str, str | None]:
    """What `rm NAME` deletes with no server to ask, decided as the server's /api/delete decides
    (hub.delete_target): a registry model's `source` at its `revision` (a registry name is no
    repo id: `llama3.2:3b` was refused for its tag), else NAME as a repo id. Nothing can be
    running from the cache through vLLama without a server, so there is no 409 to check here."""
    from . import hub

    cfg: config_mod.Config | None = None
    unreadable: config_mod.ConfigError | None = None
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        unreadable = e  # a bare repo id needs no registry
    model = cfg.lookup(name) if cfg is not None else None
    if cfg is not None and model is not None and not model.url and config_mod.is_local_source(model.source):
        _fail(f'model "{model.name}" is a local directory ({cfg.source_path(model)}); vLLama does not delete it')
    try:
        target = hub.delete_target(name, cfg)
    except hub.PullError as e:
        if unreadable is None:
            _fail(e.message)
        # NAME may well be in the registry: say why it could not be looked up.
        _fail(f"{e.message}; the registry {unreadable.path or ''} could not be read: {'; '.join(unreadable.problems)}")
    return target.repo, target.revision


@cli.group()
def dev() -> None:
    """Helpers for development and tests."""


@dev.command("tiny-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="the weights' seed (the tokenizer is always the same)")
@click.option("--force", is_flag=True, help="rewrite the directory, even if it holds something else")
def tiny_model(directory: Path, seed: int, force: bool) -> None:
    """Write a deterministic random-weight Llama (a few MB) for tests and the default config."""
    from .devtools import write_tiny_model

    try:
        path = write_tiny_model(directory, seed=seed, overwrite=force)
    except FileExistsError:
        _fail(f"{directory} exists and does not hold a tiny model; --force replaces what is there")
    except ImportError as e:
        _fail(f"{e}: the tiny model needs torch, transformers and tokenizers (pip install -e '.[dev]')")
    except OSError as e:
        _fail(f"cannot write {directory}: {e}")
    click.echo(str(path))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
