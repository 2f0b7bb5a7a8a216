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
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from . import __version__
from . import config as config_mod

CONFIG_HELP = "models.yaml to use (default: $VLLAMA_CONFIG, else configs/models.yaml)"


def _load(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        err = Console(stderr=True)
        err.print(f"[bold red]invalid registry[/] {e.path or ''}:")
        for p in e.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vllama")
def cli() -> None:
    """Serve several vLLM models behind the Ollama API."""


@cli.command()
@click.option("--config", "config_path", envvar="VLLAMA_CONFIG", help=CONFIG_HELP)
@click.option("--host", help="address to bind (default: server.host, 127.0.0.1)")
@click.option("--port", type=int, help="port to bind (default: server.port, 11434)")
@click.option("--state-dir", type=click.Path(path_type=Path), help="runtime dir for supervisord, logs, pid files")
@click.option("--attach", is_flag=True, help="use the supervisord that runs vllama (see supervisord.conf)")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
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
    out = Console()
    out.print(f"[green]valid[/] {cfg.path}: {len(cfg.models)} models", highlight=False)
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
    problems = list(plan.problems)
    for m in cfg.models:
        if m.load == "on_demand" and not m.url:
            alone = placement.plan([m], inventory, reserve_gb=cfg.server.reserve_gb, running=plan.placements,
                                   facts=model_facts, cpu_models=share)
            problems += [f"{p} (on demand)" for p in alone.problems]
    out.print(placement.render_plan_table(plan))
    if problems:
        err = Console(stderr=True)
        err.print("[bold red]the plan does not fit:[/]")
        for p in problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        sys.exit(1)


# --- commands that talk to a running server ----------------------------------------


def _base_url(host: str | None) -> str:
    """Like OLLAMA_HOST: `host[:port]` or a URL; default 127.0.0.1:11434."""
    h = host or os.environ.get("VLLAMA_HOST") or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
    if "://" not in h:
        h = "http://" + h
    scheme, rest = h.split("://", 1)
    if ":" not in rest.split("/")[0]:
        rest = rest.split("/")[0] + ":11434"
    return f"{scheme}://{rest.rstrip('/')}"


class Api:
    """The running router's HTTP API, with errors turned into one clear line."""

    def __init__(self, host: str | None) -> None:
        self.base = _base_url(host)
        key = os.environ.get("VLLAMA_API_KEY")
        self.client = httpx.Client(base_url=self.base, timeout=httpx.Timeout(30.0, read=None),
                                   headers={"Authorization": f"Bearer {key}"} if key else None)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.ConnectError:
            _fail(f"cannot reach vllama at {self.base}: is `vllama serve` running? (--host or $VLLAMA_HOST)")
        _check(r)
        return r

    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        try:
            with self.client.stream(method, path, **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                yield r
        except httpx.ConnectError:
            _fail(f"cannot reach vllama at {self.base}: is `vllama serve` running? (--host or $VLLAMA_HOST)")


def _check(r: httpx.Response) -> None:
    """Exit with the server's own `{"error": ...}` message on an HTTP error."""
    if r.status_code < 400:
        return
    try:
        msg = r.json().get("error") or r.text
    except ValueError:
        msg = r.text
    _fail(f"{msg} (HTTP {r.status_code})")


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(1)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f} GiB"


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
    """A rich table on a terminal; tab-separated plain text when piped."""
    out = Console()
    if not out.is_terminal:
        click.echo("\t".join(columns))
        for r in rows:
            click.echo("\t".join(r))
        return
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for c in columns:
        t.add_column(c, no_wrap=True)
    for i, r in enumerate(rows):
        t.add_row(*r, style=(styles[i] if styles else None))
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
    reload_error = api.request("GET", "/vllama/config").json().get("reload_error")
    if reload_error:
        Console(stderr=True).print(f"[bold red]last reload rejected[/] (still serving the previous registry): "
                                   f"{reload_error}", highlight=False)
    rows, styles = [], []
    for m in models:
        mem = f"{_gib(m.get('memory_used'))} / {_gib(m.get('memory_budget'))}"
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
    rows = [[m["name"], (m.get("digest") or "")[:12], _gib(m.get("size")) if m.get("size") else "-",
             m.get("download", ""), m.get("modified_at", "")[:19].replace("T", " ")] for m in models]
    _table("registry", ["NAME", "ID", "SIZE", "FILES", "MODIFIED"], rows)


@cli.command()
@click.argument("model")
@click.option("-n", "--lines", default=100, show_default=True, help="lines from the end")
@click.option("-f", "--follow", is_flag=True, help="keep printing what the model logs")
@host_option
def logs(model: str, lines: int, follow: bool, host: str | None) -> None:
    """The model's vLLM log."""
    api = Api(host)
    try:
        for r in api.stream("GET", f"/vllama/models/{model}/logs", params={"lines": lines, "follow": follow}):
            for chunk in r.iter_bytes():
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def _control(action: str, model: str, host: str | None, as_json: bool, wait: bool) -> None:
    api = Api(host)
    status = api.request("POST", f"/vllama/models/{model}/{action}").json()
    if wait and action != "stop":
        deadline = time.monotonic() + 900
        while status["state"] not in ("ready", "failed") and time.monotonic() < deadline:
            time.sleep(1)
            status = api.request("GET", f"/vllama/models/{model}").json()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        style = STATE_STYLE.get(status["state"], "")
        Console().print(f"{status['name']}: [{style}]{status['state']}[/] ({status['reason']})", highlight=False)
    if status["state"] == "failed":
        sys.exit(1)


control_options = [click.argument("model"), host_option, json_option,
                   click.option("--no-wait", is_flag=True, help="return without waiting for ready")]


def _with(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f
    return wrap


@cli.command()
@_with(control_options)
def start(model: str, host: str | None, as_json: bool, no_wait: bool) -> None:
    """Start a model (the others keep serving)."""
    _control("start", model, host, as_json, wait=not no_wait)


@cli.command()
@_with(control_options)
def stop(model: str, host: str | None, as_json: bool, no_wait: bool) -> None:
    """Stop a model (the others keep serving)."""
    _control("stop", model, host, as_json, wait=False)


@cli.command()
@_with(control_options)
def restart(model: str, host: str | None, as_json: bool, no_wait: bool) -> None:
    """Restart a model (the others keep serving)."""
    _control("restart", model, host, as_json, wait=not no_wait)


@cli.command()
@click.argument("model")
@click.argument("prompt", required=False)
@host_option
def run(model: str, prompt: str | None, host: str | None) -> None:
    """Chat with a model, like `ollama run`: one prompt, or an interactive session."""
    api = Api(host)
    history: list[dict[str, str]] = []

    def ask(text: str) -> None:
        history.append({"role": "user", "content": text})
        reply = []
        for r in api.stream("POST", "/api/chat", json={"model": model, "messages": history, "stream": True}):
            for line in r.iter_lines():
                if not line:
                    continue
                data = json.loads(line)
                if "error" in data:
                    _fail(data["error"])
                piece = data.get("message", {}).get("content", "")
                reply.append(piece)
                click.echo(piece, nl=False)
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})

    if prompt is not None:
        ask(prompt)
        return
    if not sys.stdin.isatty():
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
            ask(text)


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
    (`org/name[@revision]`). Interrupted pulls resume where they stopped.
    """
    from . import hub

    cfg = None
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError:
        pass  # a bare repo id needs no registry
    try:
        target = hub.resolve_target(name, cfg)
        if target.local_dir is not None:
            click.echo(f"{name} is served from the local directory {target.local_dir}: nothing to pull")
            return
        hub.render_pull(target.repo, target.revision, gguf, Console())
    except hub.PullError as e:
        _fail(e.message)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume")


@cli.command()
@click.argument("name")
@host_option
def rm(name: str, host: str | None) -> None:
    """Remove a model's cached files (refused while the model is running)."""
    from . import hub

    api = Api(host)
    try:
        api.client.get("/")
    except httpx.ConnectError:
        # No server: nothing can be running from this cache through us.
        try:
            freed = hub.delete(*hub.parse_ref(name))
        except hub.PullError as e:
            _fail(e.message)
        click.echo(f"deleted {name} ({hub.human_bytes(freed)} freed)")
        return
    api.request("DELETE", "/api/delete", json={"model": name})
    click.echo(f"deleted {name}")


@cli.group()
def dev() -> None:
    """Helpers for development and tests."""


@dev.command("tiny-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="rewrite even if the directory holds a model")
def tiny_model(directory: Path, seed: int, force: bool) -> None:
    """Write a deterministic random-weight Llama (a few MB) for tests and the default config."""
    from .devtools import write_tiny_model

    path = write_tiny_model(directory, seed=seed, overwrite=force)
    click.echo(str(path))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
