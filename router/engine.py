"""How one model's vLLM server is launched: its argv and environment.

Pure functions from the registry to a `supervisor.Program`. Flags vLLama sets
itself come first and the operator's `engine.args` and `vllm_args` last, so
an operator can override anything (vLLM's parser keeps the last value).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from .config import Config, Model, is_local_source
from .supervisor import Program

VLLM_MODULE = "vllm.entrypoints.openai.api_server"

MAX_STOP_STRINGS = 64
"""The stop strings a request may carry (vLLM's ``VLLM_MAX_STOP_STRINGS``; its default is 4).

Ollama has no limit, and a Modelfile's ``PARAMETER stop`` lines plus the ones a client adds
(LangChain, Continue) often make five or more; with vLLM's 4 such a request would be refused.
vLLM checks every stop string against each new piece of text, so the cost grows with the
count: 64 covers any real prompt format and stays cheap. Operators can still set their own
value in ``engine.env`` or a model's ``env``."""


def vllm_argv(config: Config, model: Model, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    python = config.engine.python or sys.executable
    argv = [
        python, "-m", VLLM_MODULE,
        "--model", config.source_path(model),
        "--served-model-name", model.served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        # The router probes these every second; keep the model's log for what matters.
        "--disable-access-log-for-endpoints", "/health,/metrics,/v1/models",
    ]
    if model.revision and not is_local_source(model.source):
        argv += ["--revision", model.revision]
    if model.max_model_len:
        argv += ["--max-model-len", str(model.max_model_len)]
    if model.embedding:
        argv += ["--runner", "pooling"]
    if model.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_call_parser]
    if model.reasoning_parser:
        argv += ["--reasoning-parser", model.reasoning_parser]
    if model.tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(model.tensor_parallel)]
    argv += list(extra_args)
    argv += config.engine.args
    argv += model.vllm_args
    return argv


def vllm_env(config: Config, model: Model, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONUNBUFFERED": "1",
           "VLLM_MAX_STOP_STRINGS": str(MAX_STOP_STRINGS)}
    if not is_local_source(model.source):
        # vLLama downloads (vllama pull, auto_pull); vLLM only reads the cache, so it
        # never fetches files the pull left out on purpose, nor stalls on a dead network.
        env["HF_HUB_OFFLINE"] = "1"
    env.update(config.engine.env)
    env.update(extra_env or {})
    env.update(model.env)
    return env


def max_stop_strings(config: Config, model: Model) -> int | None:
    """The most stop strings `model`'s vLLM accepts in one request, as its environment sets it
    (None if the value is not a number: vLLM then fails to start anyway)."""
    try:
        return int(vllm_env(config, model)["VLLM_MAX_STOP_STRINGS"])
    except ValueError:
        return None


def program(
    config: Config,
    model: Model,
    port: int,
    *,
    name: str | None = None,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Program:
    """The supervisord program for `model` on `port`, with the planner's flags and env."""
    return Program(
        name=name or f"{model.program}-{port}",
        argv=tuple(vllm_argv(config, model, port, extra_args)),
        env=vllm_env(config, model, extra_env),
        stopwaitsecs=config.engine.stopwaitsecs,
        nice=config.engine.nice,
    )
