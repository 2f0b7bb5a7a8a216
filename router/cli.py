"""The `vllama` command line: serve, check, and the dev helpers.

Commands that act on a running server talk to its HTTP API (the same routes
as any client); `serve` and `check` read the registry themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

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
    cfg = _load(config_path)
    out = Console()
    out.print(f"[green]ok[/] {cfg.path}: {len(cfg.models)} models")
    for m in cfg.models:
        where = m.url or cfg.source_path(m)
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        out.print(f"  {m.name}{aliases} ← {where}", markup=False, highlight=False)


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
