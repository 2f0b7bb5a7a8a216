"""Start and stop what the benchmarks load: the fake upstream, the router, LiteLLM's proxy, vLLM.

Every process is started in its own session and stopped (its whole group) on
exit, so an interrupted benchmark leaves nothing behind. CPU pinning is by
``os.sched_setaffinity`` on the child (Linux), so "on one core" means one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
ROUTER_SRC = os.environ.get("VLLAMA_ROUTER_SRC")
"""A directory holding a `router/` package to benchmark instead of this checkout's
(e.g. ``git archive REV router | tar -x -C DIR``): the router runs from there."""
LITELLM_VENV = Path(os.environ.get("VLLAMA_LITELLM_VENV", REPO / "load_tests" / ".venv-litellm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ncpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin a process and all its threads/children to `cpus` (no-op if None)."""
    if not cpus:
        return
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for t in p.threads():
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(t.id, cpus)
                p.cpu_affinity(sorted(cpus))
    except psutil.Error:
        pass


def serving_cpus(machine: set[int], bound: list[set[int]]) -> set[int] | None:
    """The cores no vLLM worker is bound to: where the rest of the serving stack belongs.

    vLLM on CPU binds each worker's OpenMP threads to its own cores and leaves the others
    "reserved for other processes" (on 2 cores: worker on core 0, core 1 reserved), but it
    pins nothing else: its API server, its EngineCore, the router and the load client float,
    and the kernel's load balancer puts one of them on the worker's core, which then loses
    10-25% of its time. None when no worker is bound or the workers hold every core.
    """
    taken = set().union(*bound) if bound else set()
    rest = machine - taken
    return rest if taken and rest else None


def keep_off_workers(roots: list[Proc]) -> set[int] | None:
    """Pin every process under `roots` but vLLM's workers (and this process: the load client)
    to `serving_cpus`; return those cores, or None (nothing pinned)."""
    machine = set(os.sched_getaffinity(0))
    workers: list[psutil.Process] = []
    others: list[psutil.Process] = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(root.pid)
            for p in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    (workers if set(p.cpu_affinity()) < machine else others).append(p)
    cpus = serving_cpus(machine, [set(w.cpu_affinity()) for w in workers])
    if cpus is None:
        return None
    for p in [*others, psutil.Process()]:
        with contextlib.suppress(psutil.Error):
            for t in p.threads():  # this process's threads only: a worker may be its child
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(t.id, cpus)
    return cpus


@dataclass(eq=False)
class Proc:
    """A child process with a log file, stopped with its whole process group."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cpus: set[int] | None = None
    cwd: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        cpus = self.cpus

        def pin() -> None:  # in the child before exec: one syscall, so its threads inherit the set
            os.sched_setaffinity(0, cpus)  # type: ignore[arg-type]

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                                         preexec_fn=pin if cpus else None, cwd=self.cwd)  # noqa: PLW1509
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} did not answer {url} in {timeout:.0f}s:\n{self.tail()}")

    def rss(self, children: bool = False) -> int:
        """Resident memory of the process (and optionally its children), bytes."""
        try:
            p = psutil.Process(self.pid)
            procs = [p, *p.children(recursive=True)] if children else [p]
            return sum(q.memory_info().rss for q in procs if q.is_running())
        except psutil.Error:
            return 0

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Stack(contextlib.ExitStack):
    """An ExitStack that also owns a scratch directory for logs and configs."""

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="vllama-bench-")) if workdir is None else workdir
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.keep_tmp = workdir is not None

    def start(self, p: Proc) -> Proc:
        p.start()
        self.procs.append(p)
        self.callback(p.stop)
        return p

    def __exit__(self, *exc: object) -> bool:
        try:
            return bool(super().__exit__(*exc))
        finally:
            if not self.keep_tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)


# --- the pieces ------------------------------------------------------------------------


def fake_upstream(stack: Stack, *, rate: float = 0.0, ttft_ms: float = 0.0, model: str = "fake",
                  cpus: set[int] | None = None, name: str = "fake") -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "load_tests.fake_upstream", "--port", str(port), "--model", model,
            "--rate", str(rate), "--ttft-ms", str(ttft_ms)]
    p = stack.start(Proc(name, argv, stack.tmp / f"{name}.log", cpus=cpus))
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health", 30)
    return p, url


def floor(stack: Stack, kind: str, upstream: str, *, cpus: set[int] | None = None) -> tuple[Proc, str]:
    """One of `load_tests.floor`'s bare relays (``tcp``, ``asgi``, ``litestar``) in front of `upstream`."""
    port = free_port()
    argv = [sys.executable, "-m", "load_tests.floor", kind, "--port", str(port), "--upstream", upstream]
    p = stack.start(Proc(f"floor-{kind}", argv, stack.tmp / f"floor-{kind}.log", cpus=cpus))
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health", 30)
    return p, url


def router_config(path: Path, models: list[dict[str, object]], **server: object) -> Path:
    data = {
        "server": {"watch": False, **server},
        "engine": {"device": "cpu", "args": ["--enforce-eager"], "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        "models": models,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def router(stack: Stack, models: list[dict[str, object]], *, cpus: set[int] | None = None,
           ready_models: list[str] = (), timeout: float = 300, env: dict[str, str] | None = None,
           src: str | None = None, **server: object) -> tuple[Proc, str]:
    """`vllama serve` with `models` (a model with ``url`` is remote: routed to, never launched).

    `src`: a directory holding the `router/` package to run (default $VLLAMA_ROUTER_SRC, else this checkout).
    """
    src = src or ROUTER_SRC
    port = free_port()
    cfg = router_config(stack.tmp / f"models-{port}.yaml", models, **server)
    argv = [sys.executable, "-m", "router.cli", "serve", "--config", str(cfg),
            "--state-dir", str(stack.tmp / f"run-{port}"), "--port", str(port), "--log-level", "warning"]
    env = dict(env or {})
    if src:
        src = str(Path(src).resolve())
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    p = stack.start(Proc("vllama", argv, stack.tmp / f"vllama-{port}.log", cpus=cpus, env=env, cwd=src))
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/", 60)
    for m in ready_models:
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.post(url + "/api/generate", json={"model": m, "stream": False}, timeout=timeout,
                           trust_env=False)
            if r.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{m} not ready via the router: {r.status_code} {r.text}\n{p.tail()}")
            time.sleep(1)
    return p, url


def litellm_available() -> bool:
    return (LITELLM_VENV / "bin" / "litellm").exists()


def litellm(stack: Stack, models: dict[str, str], *, cpus: set[int] | None = None,
            timeout: float = 180) -> tuple[Proc, str, str]:
    """LiteLLM's proxy (from its own venv) with OpenAI-compatible models behind it ({name: base URL}).

    Returns the process, its URL and the master key (random, per run) to send as a bearer token.
    """
    if not litellm_available():
        raise RuntimeError(f"LiteLLM is not installed in {LITELLM_VENV}: see load_tests/README.md")
    port = free_port()
    cfg = stack.tmp / f"litellm-{port}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_list": [{"model_name": name, "litellm_params": {
            "model": f"openai/{name}", "api_base": url + "/v1", "api_key": "none"}} for name, url in models.items()],
        "litellm_settings": {"drop_params": True, "telemetry": False, "set_verbose": False,
                             "request_timeout": 600},
        "general_settings": {},
    }))
    argv = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    key = "sk-" + secrets.token_hex(16)
    env = {"LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True",
           "NO_DOCS": "True", "LITELLM_MODE": "PRODUCTION"}
    p = stack.start(Proc("litellm", argv, stack.tmp / f"litellm-{port}.log", cpus=cpus, env=env))
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health/liveliness", timeout)
    return p, url, key


def vllm(stack: Stack, model_dir: str, name: str, *, max_num_seqs: int | None = None, max_model_len: int = 1024,
         timeout: float = 300, label: str = "vllm", nice: int = 10) -> tuple[Proc, str]:
    """A vLLM server on its own, at the CPU priority vLLama gives its vLLMs (engine.nice)."""
    port = free_port()
    argv = ["nice", "-n", str(nice), sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", name, "--port", str(port), "--host", "127.0.0.1", "--enforce-eager",
            "--max-model-len", str(max_model_len)]
    if max_num_seqs:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    p = stack.start(Proc(label, argv, stack.tmp / f"{label}-{port}.log",
                         env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}))
    url = f"http://127.0.0.1:{port}"
    p.wait_http(url + "/health", timeout)
    return p, url


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@contextlib.contextmanager
def scratch() -> Iterator[Stack]:
    with Stack() as s:
        yield s
