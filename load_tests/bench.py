"""vLLama's benchmark suite: one command per question.

    python -m load_tests.bench run --url http://127.0.0.1:11434 --api ollama --model tiny
        The seed's workloads (sequential, 5, 10, 50, 100 concurrent; fixed prompts and
        max_tokens; streaming and not) against any Ollama- or OpenAI-API URL.

    python -m load_tests.bench side-by-side [--router URL --direct URL --serial URL]
        vLLama (/api/generate, /api/chat, /v1) vs the same vLLM directly vs a serial
        vLLM (--max-num-seqs 1, Ollama's one-at-a-time stand-in), interleaved A B A B.
        Without URLs it starts them itself (a real vLLM on CPU with the tiny model).

    python -m load_tests.bench overhead
        The router's own cost, in front of a fast fake vLLM (load_tests/fake_upstream.py),
        next to the fake directly and LiteLLM's proxy: added latency and TTFT, streamed
        chunks/s relayed on one core at 1-500 concurrent streams, RSS with 500 streams.

    python -m load_tests.bench cores
        Two models on CPU vLLM generating at once: each on cores of its own (the
        planner's binding) against vLLM's own binding (both on the same cores).

Each prints tables and writes JSON plus a PNG plot under --out (load_tests/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from . import harness
from .client import Batch, Result, Target, run_batch

RESULTS = Path(__file__).resolve().parent / "results"
SEED_LEVELS = [1, 5, 10, 50, 100]


# --- statistics ---------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


@dataclass
class Row:
    """One target at one concurrency, streamed or not, over all its batches."""

    target: str
    concurrency: int
    stream: bool
    requests: int
    errors: int
    wall_s: float
    req_s: float
    tok_s: float
    chunks_s: float
    tokens_per_req: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    lat_p50_ms: float | None
    lat_p99_ms: float | None
    cpu_s: float | None = None
    """CPU seconds the server under test used (router or proxy, with the processes it started), when measured."""
    own_cpu_s: float | None = None
    """... of those, the server's own process (the router alone, without its vLLMs)."""
    first_error: str | None = None
    batch_tok_s: list[float] = field(default_factory=list)
    """Output tokens/s of each batch (one per repeat), in run order: paired ratios (see `side_ratios`)."""


def summarize(batches: Sequence[Batch], cpu_s: float | None = None, own_cpu_s: float | None = None) -> Row:
    b0 = batches[0]
    results: list[Result] = [r for b in batches for r in b.results]
    wall = sum(b.wall for b in batches)
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    errs = [r for r in results if not r.ok]
    return Row(
        target=b0.target, concurrency=b0.concurrency, stream=b0.stream, requests=len(results), errors=len(errs),
        wall_s=round(wall, 4), req_s=round(len(ok) / wall, 2) if wall else 0.0,
        tok_s=round(tokens / wall, 1) if wall else 0.0, chunks_s=round(chunks / wall, 1) if wall else 0.0,
        tokens_per_req=round(tokens / len(ok), 2) if ok else 0.0,
        ttft_p50_ms=_ms(pct([r.ttft for r in ok if r.ttft is not None], 50)),
        ttft_p99_ms=_ms(pct([r.ttft for r in ok if r.ttft is not None], 99)),
        lat_p50_ms=_ms(pct([r.latency for r in ok], 50)), lat_p99_ms=_ms(pct([r.latency for r in ok], 99)),
        cpu_s=None if cpu_s is None else round(cpu_s, 3),
        own_cpu_s=None if own_cpu_s is None else round(own_cpu_s, 3),
        first_error=errs[0].error if errs else None,
        batch_tok_s=[round(sum(r.output_tokens for r in b.results if r.ok) / b.wall, 1) if b.wall else 0.0
                     for b in batches],
    )


# --- output ---------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def print_rows(title: str, rows: Sequence[Row], chunks: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    cols = ["target", "conc", "stream", "reqs", "err", "wall s", "req/s", "out tok/s"]
    cols += ["chunks/s"] if chunks else []
    cols += ["tok/req", "TTFT p50 ms", "TTFT p99 ms", "lat p50 ms", "lat p99 ms"]
    for c in cols:
        t.add_column(c, justify="left" if c == "target" else "right")
    for r in rows:
        vals = [escape(r.target), str(r.concurrency), "yes" if r.stream else "no", str(r.requests), str(r.errors),
                _fmt(r.wall_s, 2), _fmt(r.req_s), _fmt(r.tok_s)]
        vals += [_fmt(r.chunks_s, 0)] if chunks else []
        vals += [_fmt(r.tokens_per_req), _fmt(r.ttft_p50_ms, 2), _fmt(r.ttft_p99_ms, 2), _fmt(r.lat_p50_ms, 2),
                 _fmt(r.lat_p99_ms, 2)]
        t.add_row(*vals)
    Console(width=200).print(t)
    for r in rows:
        if r.first_error:
            print(f"  {r.target} c={r.concurrency} stream={r.stream}: {r.errors} errors, first: {r.first_error}")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:  # escaped: a target named "vllama[rev-old] /v1" is not rich markup
        t.add_row(*[_fmt(v, 3) if isinstance(v, float) else escape(str(v)) for v in row])
    Console(width=200).print(t)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version()}


def write_results(out: Path, mode: str, args: argparse.Namespace, payload: dict[str, Any],
                  plot: Callable[[Path], None] | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{mode}-{stamp}.json"
    doc = {"mode": mode, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(), "command": " ".join(["python -m load_tests.bench", *sys.argv[1:]]),
           "args": {k: v for k, v in vars(args).items() if k != "func"}, **payload}
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {path}")
    if plot is not None:
        png = path.with_suffix(".png")
        try:
            plot(png)
            print(f"wrote {png}")
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    return path


def plot_rows(rows: Sequence[Row], png: Path, title: str, throughput: str = "tok_s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple[str, bool], list[Row]] = {}
    for r in rows:
        series.setdefault((r.target, r.stream), []).append(r)
    for (name, stream), rs in series.items():
        rs = sorted(rs, key=lambda r: r.concurrency)
        label = f"{name} ({'stream' if stream else 'whole'})"
        xs = [r.concurrency for r in rs]
        style = "-" if stream else "--"
        ax1.plot(xs, [getattr(r, throughput) for r in rs], style, marker="o", label=label)
        ax2.plot(xs, [r.lat_p50_ms for r in rs], style, marker="o", label=label + " p50")
    ax1.set_xscale("log")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax1.set_xlabel("concurrent requests")
    ax2.set_xlabel("concurrent requests")
    ax1.set_ylabel({"tok_s": "output tokens/s", "chunks_s": "streamed chunks/s"}.get(throughput, throughput))
    ax2.set_ylabel("latency p50 (ms)")
    ax1.set_title("throughput")
    ax2.set_title("latency")
    ax1.grid(True, alpha=0.3)
    ax2.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --- shared pieces --------------------------------------------------------------------------


def _requests_for(conc: int, per_level: int, rounds: int) -> int:
    return max(conc * rounds, per_level if conc == 1 else conc)


def streams_of(mode: str) -> list[bool]:
    return {"both": [True, False], "on": [True], "off": [False]}[mode]


def _levels(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


async def warm(targets: Sequence[Target], max_tokens: int) -> None:
    for t in targets:
        for stream in (True, False):
            b = await run_batch(t, 1, requests=2, max_tokens=max_tokens, stream=stream)
            bad = [r for r in b.results if not r.ok]
            if bad:
                raise RuntimeError(f"{t.name} ({t.url}) fails: {bad[0].status} {bad[0].error}")


async def interleaved(targets: Sequence[Target], levels: Sequence[int], streams: Sequence[bool], *,
                      repeats: int, requests: Callable[[int], int] | None = None, seconds: float | None = None,
                      max_tokens: int, skip: Callable[[Target, int], bool] = lambda t, c: False,
                      cpu_of: Callable[[Target], harness.Proc | None] = lambda t: None,
                      settle: Collection[harness.Proc] = (), log: bool = True) -> list[Row]:
    """Every (level, stream) runs each target in turn, A B A B (order flipped each repeat).

    Before each batch, every server measured (`cpu_of`) and every one in `settle` must be idle.
    """
    rows: list[Row] = []
    quiet = {p for p in (*map(cpu_of, targets), *settle) if p is not None}
    for conc in levels:
        for stream in streams:
            got: dict[str, list[Batch]] = {t.name: [] for t in targets}
            cpu: dict[str, float] = {t.name: 0.0 for t in targets}
            own: dict[str, float] = {t.name: 0.0 for t in targets}
            for rep in range(repeats):
                order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    if skip(t, conc):
                        continue
                    proc = cpu_of(t)
                    await quiesce(quiet)
                    c0, o0 = _cpu(proc), _cpu(proc, children=False)
                    b = await run_batch(t, conc, requests=requests(conc) if requests else None, seconds=seconds,
                                        max_tokens=max_tokens, stream=stream)
                    cpu[t.name] += _cpu(proc) - c0
                    own[t.name] += _cpu(proc, children=False) - o0
                    got[t.name].append(b)
            for t in targets:
                if got[t.name]:
                    measured = cpu_of(t) is not None
                    row = summarize(got[t.name], cpu[t.name] if measured else None,
                                    own[t.name] if measured else None)
                    rows.append(row)
                    if log:
                        print(f"  {row.target:28s} c={conc:<4d} stream={stream!s:5s} {row.req_s:9.1f} req/s "
                              f"{row.tok_s:10.1f} tok/s {row.chunks_s:10.0f} chunks/s  "
                              f"ttft p50 {_fmt(row.ttft_p50_ms, 2)} ms  lat p50 {_fmt(row.lat_p50_ms, 2)} ms"
                              + (f"  errors {row.errors}: {row.first_error}" if row.errors else ""), flush=True)
    return rows


async def quiesce(procs: set[harness.Proc], idle: float = 0.1, timeout: float = 20.0) -> None:
    """Wait until every server under test is idle (< 10% CPU for 100 ms): a batch must not
    pay for the backlog of the one before it (LiteLLM keeps working after its responses end)."""
    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        before = {p: _cpu(p) for p in procs}
        await asyncio.sleep(idle)
        if all(_cpu(p) - c < idle * 0.1 for p, c in before.items()):
            return


def _cpu(proc: harness.Proc | None, children: bool = True) -> float:
    """User + system CPU seconds of `proc` and (unless not `children`) what it started, but supervisord."""
    if proc is None:
        return 0.0
    try:
        p = psutil.Process(proc.pid)
        t = p.cpu_times()
        total = t.user + t.system
        for c in p.children(recursive=True) if children else ():
            if c.name().startswith("supervisord"):
                continue
            ct = c.cpu_times()
            total += ct.user + ct.system
        return total
    except psutil.Error:
        return 0.0


def _find(rows: Sequence[Row], target: str, conc: int, stream: bool) -> Row | None:
    for r in rows:
        if r.target == target and r.concurrency == conc and r.stream == stream:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def v1_available(url: str, model: str) -> bool:
    """Does the router answer the OpenAI API (/v1 pass-through)?"""
    try:
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, timeout=30,
            trust_env=False)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


# --- run: one URL, the seed's workloads -----------------------------------------------------


def cmd_run(a: argparse.Namespace) -> int:
    extra = {"ignore_eos": True} if a.api == "openai" and a.ignore_eos else {}
    endpoint = a.endpoint or "chat"
    t = Target(name=a.name or f"{a.api}:{endpoint}", url=a.url.rstrip("/"), api=a.api, endpoint=endpoint,
               model=a.model, extra=extra)
    levels = _levels(a.levels)

    async def go() -> list[Row]:
        await warm([t], a.max_tokens)
        return await interleaved([t], levels, streams_of(a.stream), repeats=1, max_tokens=a.max_tokens,
                                 requests=lambda c: _requests_for(c, a.requests, a.rounds))

    harness.install_uvloop()
    rows = asyncio.run(go())
    print_rows(f"{t.name} at {t.url} (max_tokens {a.max_tokens})", rows)
    write_results(Path(a.out), "run", a, {"rows": [asdict(r) for r in rows]},
                  lambda p: plot_rows(rows, p, f"{t.name}: {t.url}"))
    return 1 if any(r.errors for r in rows) else 0


# --- side-by-side: router vs direct vs serial on real vLLM -------------------------------------


def cmd_side_by_side(a: argparse.Namespace) -> int:
    levels = _levels(a.levels)
    serial_levels = set(_levels(a.serial_levels))
    with harness.Stack() as stack:
        router_url, direct_url, serial_url = a.router, a.direct, a.serial
        model_dir = a.model_dir or str(_tiny_model())
        router_proc: harness.Proc | None = None
        if not router_url:
            vport = harness.free_port()
            print(f"starting vLLama with the tiny model (its vLLM on port {vport}) ...", flush=True)
            router_proc, router_url = harness.router(stack, [{
                "name": a.model, "source": model_dir, "max_model_len": 1024, "port": vport}],
                ready_models=[a.model], cpus=None)
            direct_url = direct_url or f"http://127.0.0.1:{vport}"
        if not direct_url:
            raise SystemExit("--direct URL is needed with --router (the vLLM the router sends the model to)")
        # vLLama serves a model under its canonical name ("tiny" → "tiny:latest")
        served = a.served_name or (a.model if ":" in a.model else a.model + ":latest")
        serial_proc: harness.Proc | None = None
        if not serial_url and not a.no_serial:
            print("starting the serial baseline: vLLM --max-num-seqs 1 ...", flush=True)
            serial_proc, serial_url = harness.vllm(stack, model_dir, served, max_num_seqs=1,
                                                   label="vllm-serial")
        eos = {"ignore_eos": True}
        targets = [
            Target("vllama /api/generate", router_url, "ollama", "generate", a.model),
            Target("vllama /api/chat", router_url, "ollama", "chat", a.model),
        ]
        if v1_available(router_url, a.model):
            targets.append(Target("vllama /v1", router_url, "openai", "chat", a.model, extra=eos))
        else:
            print("note: the router does not answer /v1/chat/completions: pass-through left out")
        targets.append(Target("direct vLLM", direct_url, "openai", "chat", served, extra=eos))
        if serial_url:
            targets.append(Target("serial vLLM (max-num-seqs 1)", serial_url, "openai", "chat", served, extra=eos))

        def skip(t: Target, c: int) -> bool:
            return t.name.startswith("serial") and c not in serial_levels

        serving = None
        if a.pin_serving:
            serving = harness.keep_off_workers([p for p in (router_proc, serial_proc) if p])
            if serving:
                print(f"router, vLLM API servers, EngineCores and this client pinned to cores {sorted(serving)}; "
                      "vLLM's workers keep their own")
            else:
                print("--pin-serving: no vLLM worker started here is bound to cores of its own: nothing pinned")

        async def go() -> list[Row]:
            await warm(targets, a.max_tokens)
            return await interleaved(targets, levels, streams_of(a.stream), repeats=a.repeats,
                                     max_tokens=a.max_tokens, skip=skip,
                                     requests=lambda c: _requests_for(c, a.requests, a.rounds),
                                     cpu_of=lambda t: router_proc if t.name.startswith("vllama") else None,
                                     # A vLLM keeps a core busy polling for ~0.85 s after its last
                                     # request: the batch after the serial one must not pay for that
                                     # (the direct vLLM is the router's, watched through cpu_of).
                                     settle=[serial_proc] if serial_proc else [])

        harness.install_uvloop()
        t0 = time.perf_counter()
        rows = asyncio.run(go())
        print(f"measured in {time.perf_counter() - t0:.0f}s")
    print_rows(f"side by side (max_tokens {a.max_tokens}, {a.repeats} interleaved repeats)", rows)
    ratios = side_ratios(rows, targets, levels, streams_of(a.stream))
    header = ["router target", "conc", "stream", "tok/s ÷ direct", "per repeat", "median", "TTFT p50 +ms",
              "lat p50 +ms", "÷ serial (wall)", "router cores", "router µs/token"]
    print_table("router ÷ direct vLLM, and router ÷ serial baseline (>1 = router faster)", header,
                [[r["target"], r["concurrency"], "yes" if r["stream"] else "no", r["throughput_vs_direct"],
                  "–".join(map(str, r["throughput_vs_direct_range"] or [])), r["throughput_vs_direct_median"],
                  r["ttft_p50_added_ms"], r["lat_p50_added_ms"], r["speedup_vs_serial"], r["router_cores"],
                  r["router_cpu_us_per_token"]] for r in ratios])
    print_table("tok/s ÷ direct over all levels (geometric mean)",
                ["router target", "stream", "levels", "geomean", "lowest", "highest"], geomean_by_target(ratios))
    print_table("the same, of the per-repeat medians",
                ["router target", "stream", "levels", "geomean", "lowest", "highest"],
                geomean_by_target(ratios, "throughput_vs_direct_median"))
    write_results(Path(a.out), "side-by-side", a, {"rows": [asdict(r) for r in rows], "ratios": ratios,
                                                   "serving_cpus": sorted(serving) if serving else None},
                  lambda p: plot_rows(rows, p, f"vLLama vs vLLM direct vs serial (tiny model, max_tokens "
                                              f"{a.max_tokens})"))
    return 0


def side_ratios(rows: Sequence[Row], targets: Sequence[Target], levels: Sequence[int],
                streams: Sequence[bool]) -> list[dict[str, Any]]:
    out = []
    for t in targets:
        if not t.name.startswith("vllama"):
            continue
        for c in levels:
            for s in streams:
                r = _find(rows, t.name, c, s)
                d = _find(rows, "direct vLLM", c, s)
                ser = _find(rows, "serial vLLM (max-num-seqs 1)", c, s)
                if r is None:
                    continue
                out.append({
                    "target": t.name, "concurrency": c, "stream": s,
                    "throughput_vs_direct": _ratio(r.tok_s, d.tok_s if d else None),
                    # Each repeat's batch against the direct batch that ran next to it: their
                    # spread is the noise this one ratio carries.
                    "throughput_vs_direct_range": _spread(r.batch_tok_s, d.batch_tok_s) if d else None,
                    # ... and their median: one slow or fast batch (the host's noise) cannot move it.
                    "throughput_vs_direct_median": _paired_median(r.batch_tok_s, d.batch_tok_s) if d else None,
                    "req_s_vs_direct": _ratio(r.req_s, d.req_s if d else None),
                    "ttft_p50_added_ms": _diff(r.ttft_p50_ms, d.ttft_p50_ms if d else None),
                    "lat_p50_added_ms": _diff(r.lat_p50_ms, d.lat_p50_ms if d else None),
                    # the same requests: wall-time ratio = throughput ratio
                    "speedup_vs_serial": _ratio(ser.wall_s / ser.requests, r.wall_s / r.requests) if ser else None,
                    # What the router itself (not its vLLM) took of the cores the batch ran on.
                    **_router_cpu(r),
                })
    return out


def _router_cpu(r: Row) -> dict[str, float | None]:
    tokens = r.tok_s * r.wall_s
    own = r.own_cpu_s
    return {"router_cores": round(own / r.wall_s, 3) if own is not None and r.wall_s else None,
            "router_cpu_us_per_token": round(own * 1e6 / tokens, 1) if own is not None and tokens else None}


def _pairs(mine: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """Each repeat's batch ÷ the batch of the other target that ran next to it."""
    return [m / t for m, t in zip(mine, theirs, strict=False) if t]


def _spread(mine: Sequence[float], theirs: Sequence[float]) -> list[float] | None:
    """Lowest and highest of the paired per-repeat ratios."""
    pairs = _pairs(mine, theirs)
    return [round(min(pairs), 3), round(max(pairs), 3)] if pairs else None


def _paired_median(mine: Sequence[float], theirs: Sequence[float]) -> float | None:
    pairs = _pairs(mine, theirs)
    return round(statistics.median(pairs), 3) if pairs else None


def geomean_by_target(ratios: Sequence[Mapping[str, Any]], key: str = "throughput_vs_direct") -> list[list[Any]]:
    """Per router target (and streamed or not): the geometric mean of `key` over every level,
    the pooled figure that the per-level noise averages out of."""
    groups: dict[tuple[str, bool], list[float]] = {}
    for r in ratios:
        if r.get(key):
            groups.setdefault((r["target"], r["stream"]), []).append(r[key])
    return [[t, "yes" if s else "no", len(v), round(math.exp(sum(map(math.log, v)) / len(v)), 3),
             round(min(v), 3), round(max(v), 3)] for (t, s), v in groups.items()]


def _tiny_model() -> Path:
    from router.devtools import write_tiny_model

    models = Path(os.environ.get("VLLAMA_TEST_MODELS", harness.REPO / "models"))
    return write_tiny_model(models / "tiny", seed=0)


# --- cores: two CPU models busy at once, the planner's binding against vLLM's own --------------


async def pair_load(url: str, names: Sequence[str], conc: int, requests: int, max_tokens: int) -> tuple[int, float, int]:
    """Load every model of `names` at once through one router: (output tokens of all, wall seconds, errors)."""
    t0 = time.perf_counter()
    batches = await asyncio.gather(*(
        run_batch(Target(n, url, "openai", "completions", n, extra={"ignore_eos": True}), conc,
                  requests=requests, max_tokens=max_tokens, stream=True) for n in names))
    wall = time.perf_counter() - t0
    tokens = sum(r.output_tokens for b in batches for r in b.results if r.ok)
    return tokens, wall, sum(1 for b in batches for r in b.results if not r.ok)


def cmd_cores(a: argparse.Namespace) -> int:
    """Two models on the CPU, both generating: each on cores of its own (the planner's binding)
    against vLLM's own binding, which puts every server's threads on the same cores."""
    model_dir = Path(a.model_dir) if a.model_dir else _tiny_model()
    variants = {"planner": {}, "vLLM's own": {"VLLM_CPU_OMP_THREADS_BIND": "auto"}}
    names = ["a", "b"]
    with harness.Stack() as stack:
        servers: dict[str, tuple[harness.Proc, str]] = {}
        for label, env in variants.items():
            print(f"starting vLLama with two models ({label} binding) ...", flush=True)
            models = [{"name": n, "source": str(model_dir), "max_model_len": 1024, "env": env} for n in names]
            servers[label] = harness.router(stack, models, ready_models=names)
        got: dict[str, list[float]] = {label: [] for label in variants}

        async def go() -> None:
            for label, (_, url) in servers.items():
                await pair_load(url, names, 2, 4, 8)  # warm
            for rep in range(a.repeats):
                order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                for label in order:
                    await quiesce({p for p, _ in servers.values()})
                    tokens, wall, errors = await pair_load(servers[label][1], names, a.concurrency,
                                                           a.requests, a.max_tokens)
                    if errors:
                        raise RuntimeError(f"{label}: {errors} requests failed")
                    tok_s = tokens / wall
                    got[label].append(tok_s)
                    print(f"  repeat {rep + 1} {label:12s} {tok_s:8.1f} tok/s (both models)", flush=True)

        asyncio.run(go())
    mine, theirs = got["planner"], got["vLLM's own"]
    ratio = {"paired_median": _paired_median(mine, theirs), "range": _spread(mine, theirs)}
    print_table("two CPU models generating at once (output tok/s of both)",
                ["binding", "median tok/s", "per repeat"],
                [[label, round(statistics.median(v), 1), ", ".join(f"{x:.0f}" for x in v)] for label, v in got.items()])
    print(f"planner ÷ vLLM's own: median {ratio['paired_median']}, range {ratio['range']}")
    write_results(Path(a.out), "cores", a, {"tok_s": got, "planner_vs_vllm": ratio}, None)
    return 0


# --- overhead: the router alone, in front of a fake vLLM ------------------------------------------


def cmd_overhead(a: argparse.Namespace) -> int:
    ncpu = harness.ncpus()
    server_cpus = {a.server_cpu} if ncpu > 1 else None
    rest = (set(range(ncpu)) - {a.server_cpu}) if ncpu > 1 else None
    if rest:
        os.sched_setaffinity(0, rest)
    levels = _levels(a.levels)
    result: dict[str, Any] = {"server_cpus": sorted(server_cpus or []), "client_cpus": sorted(rest or [])}
    with harness.Stack() as stack:
        _, fake_url = harness.fake_upstream(stack, cpus=rest, name="fake")
        paced, paced_url = harness.fake_upstream(stack, cpus=rest, rate=a.paced_rate, name="fake-paced")
        procs: dict[str, harness.Proc | None] = {}
        targets = [Target("fake direct", fake_url, "openai", "chat", "fake")]
        procs["fake direct"] = None
        has_v1 = False
        if a.router:
            models = [{"name": "fake", "source": "fake/fake", "url": fake_url},
                      {"name": "paced", "source": "fake/paced", "url": paced_url}]
            # One router per --router-src (before/after comparisons, interleaved in one run).
            for src in a.router_src or [None]:
                tag = f"[{Path(src).name}]" if a.router_src and len(a.router_src) > 1 else ""
                proc, url = harness.router(stack, models, cpus=server_cpus, ready_models=["fake", "paced"], src=src)
                for ep in a.ollama_endpoints.split(","):
                    if ep:
                        name = f"vllama{tag} /api/{ep}"
                        targets.append(Target(name, url, "ollama", ep, "fake"))
                        procs[name] = proc
                v1 = v1_available(url, "fake")
                has_v1 = has_v1 or v1
                if v1:
                    targets.append(Target(f"vllama{tag} /v1", url, "openai", "chat", "fake"))
                    procs[f"vllama{tag} /v1"] = proc
                else:
                    print("note: the router does not answer /v1/chat/completions: pass-through left out")
        lite_proc = lite_url = None
        if a.litellm and harness.litellm_available():
            print("starting LiteLLM proxy ...", flush=True)
            lite_proc, lite_url, lite_key = harness.litellm(stack, {"fake": fake_url, "paced": paced_url},
                                                            cpus=server_cpus)
            lite_auth = {"authorization": f"Bearer {lite_key}"}
            targets.append(Target("litellm proxy", lite_url, "openai", "chat", "fake", headers=lite_auth))
            procs["litellm proxy"] = lite_proc
        elif a.litellm:
            print(f"note: LiteLLM not installed in {harness.LITELLM_VENV} (see load_tests/README.md): left out")
        result["targets"] = [t.name for t in targets]
        harness.install_uvloop()

        async def go() -> None:
            await warm(targets, 16)
            print("\n1) latency, one request at a time (added latency = via - direct)", flush=True)
            lat = await interleaved(targets, [1], [False, True], repeats=a.repeats,
                                    requests=lambda c: a.latency_requests // a.repeats, max_tokens=a.latency_tokens,
                                    cpu_of=lambda t: procs.get(t.name))
            result["latency"] = [asdict(r) for r in lat]
            print(f"\n2) streamed chunks relayed: {a.seconds}s per level, {a.stream_tokens} tokens per request, "
                  f"server on CPU {sorted(server_cpus or [])}", flush=True)
            thr = await interleaved(targets, levels, [True], repeats=a.repeats, seconds=a.seconds / a.repeats,
                                    max_tokens=a.stream_tokens, cpu_of=lambda t: procs.get(t.name),
                                    skip=lambda t, c: t.name.startswith("litellm") and c > a.litellm_max_conc)
            result["throughput"] = [asdict(r) for r in thr]
            if a.rss_streams:
                print(f"\n3) {a.rss_streams} open streams at {a.paced_rate:g} tokens/s each "
                      f"({a.rss_streams * a.paced_rate:,.0f} chunks/s offered): RSS and delivered rate", flush=True)
                rss = []
                servers = [(t.name, t.url, t.api, procs[t.name], {}) for t in targets
                           if t.name.startswith("vllama") and (t.name.endswith("/api/chat") or t.name.endswith("/v1"))]
                if lite_proc is not None and a.litellm_max_conc >= a.rss_streams:
                    servers.append(("litellm proxy", lite_url, "openai", lite_proc, lite_auth))
                # The floor: what bare relays on the router's stack pay per token (load_tests/floor.py).
                for kind in ("tcp", "asgi", "litestar") if a.floor else ():
                    proc, url = harness.floor(stack, kind, paced_url, cpus=server_cpus)
                    servers.append((f"floor: {kind} relay", url, "openai", proc, {}))
                # The fake's own figures: what a bare server writing each token costs.
                servers.append(("fake direct", paced_url, "openai", paced, {}))
                # Once per repeat, the order flipped each time (A B C, C B A) like the rows above.
                for repeat in range(a.repeats):
                    for name, url, api, proc, headers in servers if repeat % 2 == 0 else servers[::-1]:
                        t = Target(name, url, api, "chat", "paced", headers=headers)
                        r = await paced_run(t, proc, a.rss_streams, int(a.paced_rate * a.paced_seconds))
                        r["offered_chunks_s"] = a.rss_streams * a.paced_rate
                        r["repeat"] = repeat
                        rss.append(r)
                result["rss"] = sorted(rss, key=lambda r: [s[0] for s in servers].index(r["target"]))

        asyncio.run(go())
    lat_rows = [Row(**r) for r in result["latency"]]
    thr_rows = [Row(**r) for r in result["throughput"]]
    print_rows("latency at concurrency 1", lat_rows)
    print_rows("streamed relay throughput", thr_rows, chunks=True)
    summary = overhead_summary(lat_rows, thr_rows, [t.name for t in targets])
    result["summary"] = summary
    print_table("overhead vs the fake upstream directly", ["server", "added lat p50 ms (whole)",
                "added TTFT p50 ms (stream)", "max chunks/s", "at conc", "server CPU µs/chunk"],
                [[s["target"], s["added_lat_p50_ms"], s["added_ttft_p50_ms"], s["max_chunks_s"],
                  s["max_chunks_at"], s["cpu_us_per_chunk"]] for s in summary])
    if result.get("rss"):
        print_table("open streams (one token per write)", ["server", "streams", "RSS before MB", "RSS peak MB",
                                                           "chunks/s delivered", "offered", "server CPU µs/chunk",
                                                           "errors"],
                    [[r["target"], r["streams"], r["rss_before_mb"], r["rss_peak_mb"], r["chunks_s"],
                      r["offered_chunks_s"], r.get("cpu_us_per_chunk"), r["errors"]] for r in result["rss"]])
    write_results(Path(a.out), "overhead", a, result,
                  lambda p: plot_rows(thr_rows, p, "router overhead: chunks/s relayed on one core",
                                      throughput="chunks_s"))
    return 0


def overhead_summary(lat: Sequence[Row], thr: Sequence[Row], names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    d_whole = _find(lat, "fake direct", 1, False)
    d_stream = _find(lat, "fake direct", 1, True)
    for n in names:
        whole, stream = _find(lat, n, 1, False), _find(lat, n, 1, True)
        mine = [r for r in thr if r.target == n]
        best = max(mine, key=lambda r: r.chunks_s) if mine else None
        chunks = sum(r.chunks_s * r.wall_s for r in mine)
        cpu = sum(r.cpu_s or 0 for r in mine)
        out.append({
            "target": n,
            "added_lat_p50_ms": _diff(whole.lat_p50_ms if whole else None, d_whole.lat_p50_ms if d_whole else None),
            "added_ttft_p50_ms": _diff(stream.ttft_p50_ms if stream else None,
                                       d_stream.ttft_p50_ms if d_stream else None),
            "max_chunks_s": best.chunks_s if best else None, "max_chunks_at": best.concurrency if best else None,
            "cpu_us_per_chunk": round(cpu / chunks * 1e6, 2) if chunks and cpu else None,
        })
    return out


async def paced_run(t: Target, proc: harness.Proc | None, streams: int, tokens: int) -> dict[str, Any]:
    """`streams` concurrent slow streams; sample the server's RSS while they are open.

    Also the server's CPU per chunk: here every token comes in a write of its own, as from
    vLLM (one token per stream per engine step), so each costs a read, a write and a turn of
    the loop; the throughput rows, with tokens as fast as asked, relay many per read.
    """
    before = proc.rss() if proc else 0
    cpu0 = _cpu(proc)
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            if proc:
                peak = max(peak, proc.rss())
            await asyncio.sleep(0.2)

    s = asyncio.create_task(sample())
    try:
        b = await run_batch(t, streams, requests=streams, max_tokens=tokens, stream=True)
    finally:
        done.set()
        await s
    cpu = _cpu(proc) - cpu0
    row = summarize([b])
    chunks = sum(r.chunks for r in b.results if r.ok)
    mb = 1 / 2**20
    r = {"target": t.name, "streams": streams, "tokens_per_stream": tokens,
         "rss_before_mb": round(before * mb, 1) if proc else None,
         "rss_peak_mb": round(peak * mb, 1) if proc else None, "chunks_s": row.chunks_s,
         "offered_chunks_s": None, "errors": row.errors, "lat_p50_ms": row.lat_p50_ms,
         "cpu_us_per_chunk": round(cpu / chunks * 1e6, 1) if proc and chunks else None,
         "first_error": row.first_error}
    print(f"  {t.name:20s} {streams} streams: RSS {r['rss_before_mb']} → peak {r['rss_peak_mb']} MB, "
          f"{row.chunks_s:,.0f} chunks/s, {r['cpu_us_per_chunk']} µs CPU/chunk, errors {row.errors}", flush=True)
    return r


# --- CLI ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, levels: str, max_tokens: int) -> None:
        p.add_argument("--levels", default=levels, help="concurrency levels, comma-separated")
        p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per request (EOS ignored)")
        p.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG")

    r = sub.add_parser("run", help="the seed workloads against one URL")
    r.add_argument("--url", required=True)
    r.add_argument("--api", choices=["ollama", "openai"], default="ollama")
    r.add_argument("--endpoint", choices=["generate", "chat", "completions"],
                   help="ollama: generate|chat (default chat); openai: chat|completions")
    r.add_argument("--model", required=True)
    r.add_argument("--name", help="label in tables")
    r.add_argument("--stream", choices=["both", "on", "off"], default="both")
    r.add_argument("--requests", type=int, default=10, help="requests at concurrency 1")
    r.add_argument("--rounds", type=int, default=2, help="requests per level = rounds × concurrency")
    r.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send vLLM's ignore_eos (OpenAI API only; Ollama has no such option)")
    common(r, ",".join(map(str, SEED_LEVELS)), 32)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("side-by-side", help="router vs direct vLLM vs serial vLLM, interleaved")
    s.add_argument("--router", help="vLLama URL (default: start one with the tiny model)")
    s.add_argument("--direct", help="the vLLM behind the router, directly")
    s.add_argument("--serial", help="a vLLM started with --max-num-seqs 1 (default: start one)")
    s.add_argument("--no-serial", action="store_true", help="leave the serial baseline out")
    s.add_argument("--model", default="tiny", help="model name via the router")
    s.add_argument("--served-name", help="model name vLLM serves (default: as --model; vLLama: tiny:latest)")
    s.add_argument("--model-dir", help="model directory for started servers (default: models/tiny)")
    s.add_argument("--stream", choices=["both", "on", "off"], default="both")
    s.add_argument("--repeats", type=int, default=2, help="interleaved repeats (A B, B A, ...)")
    s.add_argument("--requests", type=int, default=10, help="requests at concurrency 1")
    s.add_argument("--rounds", type=int, default=2, help="requests per level = rounds × concurrency")
    s.add_argument("--serial-levels", default="1,5,10", help="levels the serial baseline runs (it is slow)")
    s.add_argument("--pin-serving", action="store_true",
                   help="keep everything but vLLM's workers (router, API servers, EngineCores, this client) off "
                        "the cores vLLM bound its workers to (servers started here only)")
    common(s, ",".join(map(str, SEED_LEVELS)), 32)
    s.set_defaults(func=cmd_side_by_side)

    o = sub.add_parser("overhead", help="the router's own cost in front of a fake vLLM, vs LiteLLM")
    o.add_argument("--server-cpu", type=int, default=0, help="core the router / proxy is pinned to")
    o.add_argument("--seconds", type=float, default=4.0, help="seconds per level and target")
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--latency-requests", type=int, default=400)
    o.add_argument("--latency-tokens", type=int, default=16)
    o.add_argument("--stream-tokens", type=int, default=256, help="tokens per streamed request")
    o.add_argument("--ollama-endpoints", default="chat,generate")
    o.add_argument("--no-litellm", dest="litellm", action="store_false", help="leave LiteLLM's proxy out")
    o.add_argument("--litellm-max-conc", type=int, default=100,
                   help="highest level LiteLLM runs (at 500 streams it needs minutes per batch)")
    o.add_argument("--router-src", action="append",
                   help="a directory with a router/ package to run (repeat to compare versions, interleaved)")
    o.add_argument("--no-router", dest="router", action="store_false",
                   help="only the fake upstream directly (a self-test of the bench)")
    o.add_argument("--rss-streams", type=int, default=500, help="open streams for the RSS check (0: skip)")
    o.add_argument("--paced-rate", type=float, default=50.0, help="tokens/s per stream in the RSS check")
    o.add_argument("--paced-seconds", type=float, default=6.0, help="length of each paced stream")
    o.add_argument("--floor", action="store_true",
                   help="add bare relays (load_tests/floor.py: a byte pipe, uvicorn + ASGI, Litestar) to the "
                        "open-streams run: what any relay on this stack pays per token")
    common(o, "1,10,100,500", 16)
    o.set_defaults(func=cmd_overhead)

    c = sub.add_parser("cores", help="two CPU models busy at once: the planner's cores vs vLLM's own binding")
    c.add_argument("--model-dir", help="model directory (default: models/tiny, written if missing)")
    c.add_argument("--repeats", type=int, default=4, help="interleaved repeats (A B, B A, ...)")
    c.add_argument("--concurrency", type=int, default=10, help="concurrent requests per model")
    c.add_argument("--requests", type=int, default=40, help="requests per model and repeat")
    c.add_argument("--max-tokens", type=int, default=64, help="tokens per request (EOS ignored)")
    c.add_argument("--out", default=str(RESULTS), help="directory for the JSON")
    c.set_defaults(func=cmd_cores)

    a = ap.parse_args(argv)
    return int(a.func(a) or 0)


if __name__ == "__main__":
    sys.exit(main())
