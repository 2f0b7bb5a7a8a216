"""Reliability runs: long load, many requests, and a soak with models killed under it.

Three modes, each printing a summary and writing JSON to ``load_tests/results/``
(the figures of the README's "Reliability and security figures" come from here):

* ``streams``: C concurrent streaming clients (default 500) held for S seconds (default 60)
  against the router in front of the fast fake upstream, paced so that every stream stays
  open: zero errors expected, RSS flat (sampled every 0.5 s; growth = end vs. the steady state,
  the median over 15-25 % of the run, when every stream is open).
* ``requests``: N requests (default 100,000) in batches of 10,000 that rotate through the
  Ollama API (chat streamed, generate whole) and the OpenAI pass-through, at concurrency C;
  RSS after each batch: growth beyond 10 % of the warm baseline fails the run.
* ``kill``: real vLLM on CPU. `vllama serve` with two tiny models; clients keep sending
  requests (streamed and not, Ollama and OpenAI APIs) for M minutes (default 5) while one
  model's vLLM is killed (SIGKILL) every K seconds (default 60). Every request must succeed
  or end with a clear error (an error status with a message, or a stream's final error
  line/event); a request still open after --hang seconds counts as a hang. Zero hangs and
  zero unclear endings expected.

    .venv/bin/python -m load_tests.soak streams  [--clients 500 --seconds 60 --rate 10 --tokens 64]
    .venv/bin/python -m load_tests.soak requests [--total 100000 --concurrency 32]
    .venv/bin/python -m load_tests.soak kill     [--minutes 5 --every 60]

tests/test_load_short.py runs the first two briefly in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import harness
from .client import Batch, Target, run_batch

MB = 1 / 2**20
OUT = Path(__file__).resolve().parent / "results"


# --- memory ------------------------------------------------------------------------------------


class RssSampler:
    """The router's RSS every `every` seconds while running."""

    def __init__(self, proc: harness.Proc, every: float = 0.5) -> None:
        self.proc = proc
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, self.proc.rss()))
            await asyncio.sleep(self.every)

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.samples.append((time.monotonic() - self._t0, self.proc.rss()))

    def summary(self, baseline: int) -> dict[str, Any]:
        values = [v for _, v in self.samples if v]
        end = values[-1] if values else 0
        # slope over the second half (steady state), MB per minute
        half = [(t, v) for t, v in self.samples[len(self.samples) // 2:] if v]
        slope = None
        if len(half) >= 3:
            ts = [t for t, _ in half]
            vs = [v * MB for _, v in half]
            mt, mv = statistics.fmean(ts), statistics.fmean(vs)
            den = sum((t - mt) ** 2 for t in ts)
            slope = round(sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / den * 60, 2) if den else None
        # the steady state's own baseline: the median over 15-25 % of the run (all streams open by then)
        span = self.samples[-1][0] if self.samples else 0
        early = [v for t, v in self.samples if v and 0.15 * span <= t <= 0.25 * span]
        steady = int(statistics.median(early)) if early else baseline
        return {"rss_baseline_mb": round(baseline * MB, 1), "rss_steady_mb": round(steady * MB, 1),
                "rss_growth_from_steady_pct": round((end - steady) / steady * 100, 1) if steady else None,
                "rss_peak_mb": round(max(values, default=0) * MB, 1),
                "rss_end_mb": round(end * MB, 1),
                "rss_growth_pct": round((end - baseline) / baseline * 100, 1) if baseline else None,
                "rss_slope_mb_per_min_2nd_half": slope, "rss_samples": len(values),
                "rss_every_10pct_mb": [round(self._at(span * i / 10) * MB, 1) for i in range(11)]}

    def _at(self, t: float) -> int:
        """The sample nearest to `t` seconds."""
        return min(self.samples, key=lambda s: abs(s[0] - t))[1] if self.samples else 0


def _errors(batches: list[Batch]) -> tuple[int, int, Counter[str]]:
    n = errs = 0
    kinds: Counter[str] = Counter()
    for b in batches:
        for r in b.results:
            n += 1
            if not r.ok:
                errs += 1
                kinds[(r.error or f"HTTP {r.status}")[:120]] += 1
    return n, errs, kinds


def _write(mode: str, result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"mode": mode, "machine": {"cores": harness.ncpus(), "python": sys.version.split()[0],
                                         "load_avg": os.getloadavg()}, **result}
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return path


async def _fake_running(url: str) -> int | None:
    try:
        async with httpx.AsyncClient(timeout=2, trust_env=False) as c:
            text = (await c.get(url + "/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


# --- streams ------------------------------------------------------------------------------------


async def streams(clients: int, seconds: float, rate: float, tokens: int, router_url: str, fake_url: str,
                  router_proc: harness.Proc, api: str = "ollama") -> dict[str, Any]:
    """`clients` streaming clients, closed loop, for `seconds`; RSS and streams held sampled throughout."""
    target = Target(f"vllama {api}", router_url, api, "chat", "fake")
    # warm-up at full concurrency: every connection, pool and buffer the steady state needs
    await run_batch(target, clients, requests=clients * 2, max_tokens=4, stream=True)
    await asyncio.sleep(1.0)
    baseline = router_proc.rss()
    sampler = RssSampler(router_proc).start()
    held: list[int] = []
    stop = asyncio.Event()

    async def watch_held() -> None:
        while not stop.is_set():
            n = await _fake_running(fake_url)
            if n is not None:
                held.append(n)
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch_held())
    t0 = time.monotonic()
    batch = await run_batch(target, clients, seconds=seconds, max_tokens=tokens, stream=True)
    wall = time.monotonic() - t0
    stop.set()
    await watcher
    await sampler.stop()
    await asyncio.sleep(2.0)
    after_idle = router_proc.rss()
    n, errs, kinds = _errors([batch])
    chunks = sum(r.chunks for r in batch.results)
    steady = held[2:-2] if len(held) > 6 else held
    out = {"clients": clients, "seconds": round(wall, 1), "rate_tok_s_per_stream": rate,
           "tokens_per_request": tokens, "requests": n, "errors": errs, "error_kinds": dict(kinds.most_common(5)),
           "chunks": chunks, "chunks_per_s": round(chunks / wall), "streams_held_min": min(steady, default=None),
           "streams_held_median": statistics.median(steady) if steady else None,
           "rss_after_idle_mb": round(after_idle * MB, 1), **sampler.summary(baseline)}
    return out


def cmd_streams(a: argparse.Namespace) -> int:
    with harness.Stack() as stack:
        _, fake_url = harness.fake_upstream(stack, rate=a.rate, name="fake-paced")
        proc, url = harness.router(stack, [{"name": "fake", "source": "fake/fake", "url": fake_url}],
                                   ready_models=["fake"], max_inflight=max(2048, a.clients * 2))
        harness.install_uvloop()
        print(f"{a.clients} streaming clients for {a.seconds:g}s at {a.rate:g} tokens/s, {a.tokens} tokens each ...",
              flush=True)
        res = asyncio.run(streams(a.clients, a.seconds, a.rate, a.tokens, url, fake_url, proc, a.api))
    _print(res)
    _write("streams", res, a.out)
    # flat memory: what the steady state (every stream open) holds does not grow
    ok = res["errors"] == 0 and (res["rss_growth_from_steady_pct"] or 0) <= a.max_growth
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# --- requests -----------------------------------------------------------------------------------


async def many_requests(total: int, concurrency: int, router_url: str, router_proc: harness.Proc,
                        batch_size: int = 10_000, tokens: int = 8, warmup: int = 2_000) -> dict[str, Any]:
    kinds = [Target("ollama chat stream", router_url, "ollama", "chat", "fake"),
             Target("ollama generate whole", router_url, "ollama", "generate", "fake"),
             Target("openai chat stream", router_url, "openai", "chat", "fake")]
    streamed = [True, False, True]
    for t, s in zip(kinds, streamed):  # warm-up, not counted
        await run_batch(t, concurrency, requests=max(warmup // len(kinds), concurrency), max_tokens=tokens, stream=s)
    baseline = router_proc.rss()
    rows = []
    sent = 0
    batches: list[Batch] = []
    t0 = time.monotonic()
    i = 0
    while sent < total:
        n = min(batch_size, total - sent)
        t, s = kinds[i % len(kinds)], streamed[i % len(kinds)]
        b = await run_batch(t, concurrency, requests=n, max_tokens=tokens, stream=s)
        batches.append(b)
        sent += n
        _, errs, _ = _errors([b])
        rss = router_proc.rss()
        rows.append({"after": sent, "kind": t.name, "errors": errs, "req_s": round(n / b.wall),
                     "rss_mb": round(rss * MB, 1)})
        print(f"  {sent:>7,} requests ({t.name:22s}) {n / b.wall:7,.0f} req/s  errors {errs}  "
              f"RSS {rss * MB:6.1f} MB", flush=True)
        i += 1
    wall = time.monotonic() - t0
    n, errs, err_kinds = _errors(batches)
    end = router_proc.rss()
    peak = max([baseline, *[int(r["rss_mb"] / MB) for r in rows]])
    return {"requests": n, "concurrency": concurrency, "tokens_per_request": tokens, "seconds": round(wall, 1),
            "req_per_s": round(n / wall), "errors": errs, "error_kinds": dict(err_kinds.most_common(5)),
            "rss_baseline_mb": round(baseline * MB, 1), "rss_peak_mb": round(peak * MB, 1),
            "rss_end_mb": round(end * MB, 1), "rss_growth_pct": round((end - baseline) / baseline * 100, 1),
            "batches": rows}


def cmd_requests(a: argparse.Namespace) -> int:
    with harness.Stack() as stack:
        _, fake_url = harness.fake_upstream(stack, name="fake")
        proc, url = harness.router(stack, [{"name": "fake", "source": "fake/fake", "url": fake_url}],
                                   ready_models=["fake"])
        harness.install_uvloop()
        print(f"{a.total:,} requests at concurrency {a.concurrency} ...", flush=True)
        res = asyncio.run(many_requests(a.total, a.concurrency, url, proc, a.batch))
    _print({k: v for k, v in res.items() if k != "batches"})
    _write("requests", res, a.out)
    ok = res["errors"] == 0 and res["rss_growth_pct"] <= a.max_growth
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# --- kill: real vLLM, a model killed every minute --------------------------------------------------


@dataclass
class Outcome:
    kind: str
    """ok, error (a clear error status or final error line), unclear (cut without saying why), hang."""
    api: str
    stream: bool
    model: str
    seconds: float
    detail: str = ""
    ended_at: float = 0.0
    """Seconds since the soak started."""


@dataclass
class KillLog:
    kills: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


def _clear_error(status: int, text: str) -> str | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return f"HTTP {status}: {err}" if isinstance(err, str) and err else None


async def _one(client: httpx.AsyncClient, model: str, api: str, stream: bool, hang: float,
               start: float = 0.0) -> Outcome:
    t0 = time.monotonic()
    prompt = random.choice(["Tell me a story.", "Count to ten.", "Why is the sky blue?"])
    if api == "ollama":
        path, body = "/api/chat", {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}],
                                   "options": {"num_predict": 48, "temperature": 0}}
    else:
        path, body = "/v1/chat/completions", {"model": model, "stream": stream, "max_tokens": 48, "temperature": 0,
                                              "messages": [{"role": "user", "content": prompt}]}

    def out(kind: str, detail: str = "") -> Outcome:
        now = time.monotonic()
        return Outcome(kind, api, stream, model, round(now - t0, 2), detail[:200], round(now - start, 2))

    try:
        async with asyncio.timeout(hang):
            async with client.stream("POST", path, json=body) as r:
                text = (await r.aread()).decode(errors="replace")
                if r.status_code >= 400:
                    err = _clear_error(r.status_code, text)
                    return out("error", err) if err else out("unclear", f"HTTP {r.status_code}: {text[:150]}")
                if not stream:
                    doc = json.loads(text)
                    return out("ok") if ("message" in doc or "choices" in doc) else out("unclear", text[:150])
                if api == "ollama":
                    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
                    last = lines[-1] if lines else {}
                    if last.get("done"):
                        return out("ok")
                    if "error" in last:
                        return out("error", f"stream ended with error: {last['error']}")
                    return out("unclear", f"stream cut after {len(lines)} lines")
                events = [e.strip()[5:].strip() for e in text.split("\n\n") if e.strip().startswith("data:")]
                if events and events[-1] == "[DONE]":
                    return out("ok")
                for ev in reversed(events):
                    try:
                        doc = json.loads(ev)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and "error" in doc:
                        return out("error", f"stream ended with error event: {json.dumps(doc['error'])[:150]}")
                    break
                return out("unclear", f"SSE stream cut after {len(events)} events")
    except TimeoutError:
        return out("hang", f"no end after {hang:g}s")
    except httpx.HTTPError as e:
        return out("unclear", f"{type(e).__name__}: {e}")
    except ValueError as e:
        return out("unclear", f"undecodable: {e}")


async def kill_soak(url: str, models: list[str], minutes: float, every: float, clients: int, hang: float,
                    log: KillLog) -> None:
    deadline = time.monotonic() + minutes * 60
    t0 = time.monotonic()

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(hang + 5), trust_env=False) as c:
            n = 0
            while time.monotonic() < deadline:
                model = models[(i + n) % len(models)]
                api = "ollama" if (i + n) % 3 else "openai"
                stream = (i + n) % 2 == 0
                log.outcomes.append(await _one(c, model, api, stream, hang, t0))
                n += 1

    async def killer() -> None:
        k = 0
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as c:
            while True:
                await asyncio.sleep(every)
                if time.monotonic() >= deadline:
                    return
                name = models[k % len(models)]
                k += 1
                try:
                    status = (await c.get(f"/vllama/models/{name}")).json()
                except (httpx.HTTPError, ValueError) as e:
                    log.kills.append({"at_s": round(time.monotonic() - t0), "model": name, "error": str(e)})
                    continue
                pid = status.get("pid")
                entry = {"at_s": round(time.monotonic() - t0, 2), "model": name, "state": status.get("state"),
                         "pid": pid}
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        entry["killed"] = True
                    except ProcessLookupError:
                        entry["killed"] = False
                log.kills.append(entry)
                print(f"  t={entry['at_s']:>6.1f}s killed {name} (pid {pid}, was {entry['state']})", flush=True)

    async def progress() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(30)
            c = Counter(o.kind for o in log.outcomes)
            print(f"  t={time.monotonic() - t0:>4.0f}s requests {len(log.outcomes)}: {dict(c)}", flush=True)

    kill_task = asyncio.create_task(killer())
    prog = asyncio.create_task(progress())
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    kill_task.cancel()
    prog.cancel()


def cmd_kill(a: argparse.Namespace) -> int:
    tiny = [harness.REPO / "models" / "tiny", harness.REPO / "models" / "tiny-b"]
    for i, d in enumerate(tiny):
        if not (d / "config.json").exists():
            from router.devtools import write_tiny_model

            write_tiny_model(d, seed=i)
    names = ["tiny", "tiny-b"][: a.models]
    models = [{"name": n, "source": str(d), "max_model_len": 512} for n, d in zip(names, tiny)]
    log = KillLog()
    with harness.Stack() as stack:
        print(f"starting vllama serve with {len(models)} tiny models on real vLLM (CPU) ...", flush=True)
        proc, url = harness.router(stack, models, ready_models=names, timeout=600, cold_start_timeout=120)
        print(f"{a.minutes:g} minutes, {a.clients} clients, one model killed every {a.every:g}s ...", flush=True)
        t0 = time.monotonic()
        asyncio.run(kill_soak(url, names, a.minutes, a.every, a.clients, a.hang, log))
        wall = time.monotonic() - t0
        tail = proc.tail(60)
    kinds = Counter(o.kind for o in log.outcomes)
    errors = Counter(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", o.detail)[:120]
                     for o in log.outcomes if o.kind == "error")
    for k in log.kills:  # how long until the killed model answered again
        after = [o.ended_at for o in log.outcomes if o.model == k["model"] and o.kind == "ok"
                 and o.ended_at - o.seconds > k["at_s"]]  # started after the kill
        k["served_again_after_s"] = round(min(after) - k["at_s"], 1) if after else None
        k["errors_for_it"] = sum(1 for o in log.outcomes if o.model == k["model"] and o.kind == "error"
                                 and k["at_s"] <= o.ended_at <= k["at_s"] + 60)
    res = {"minutes": round(wall / 60, 2), "clients": a.clients, "models": names, "kill_every_s": a.every,
           "hang_after_s": a.hang, "kills": log.kills,
           "by_api": {f"{api} {'stream' if st else 'whole'}": dict(Counter(o.kind for o in log.outcomes
                                                                             if o.api == api and o.stream == st))
                      for api in ("ollama", "openai") for st in (True, False)}, "requests": len(log.outcomes), "outcomes": dict(kinds),
           "error_messages": dict(errors.most_common(10)),
           "unclear": [asdict(o) for o in log.outcomes if o.kind in ("unclear", "hang")][:20],
           "errors": [asdict(o) for o in log.outcomes if o.kind == "error"][:50],
           "slowest_s": max((o.seconds for o in log.outcomes), default=None)}
    _print({k: v for k, v in res.items() if k not in ("kills", "unclear", "errors")})
    for k in log.kills:
        print(f"  kill at {k['at_s']}s: {k['model']} served again after {k.get('served_again_after_s')}s, "
              f"{k.get('errors_for_it')} requests ended with an error")
    if res["unclear"]:
        print("unclear or hung:", json.dumps(res["unclear"][:5], indent=1))
        print(tail)
    _write("kill", res, a.out)
    ok = kinds.get("hang", 0) == 0 and kinds.get("unclear", 0) == 0 and kinds.get("ok", 0) > 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


# --- CLI ----------------------------------------------------------------------------------------


def _print(d: dict[str, Any]) -> None:
    width = max(len(k) for k in d)
    for k, v in d.items():
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("streams", help="C streaming clients held for S seconds (fake upstream)")
    s.add_argument("--clients", type=int, default=500)
    s.add_argument("--seconds", type=float, default=60)
    s.add_argument("--rate", type=float, default=10.0, help="tokens/s per stream (the fake's pace)")
    s.add_argument("--tokens", type=int, default=64, help="tokens per request")
    s.add_argument("--api", choices=["ollama", "openai"], default="ollama")
    s.add_argument("--max-growth", type=float, default=10.0, help="RSS growth allowed, %%")
    r = sub.add_parser("requests", help="N requests, RSS after each batch (fake upstream)")
    r.add_argument("--total", type=int, default=100_000)
    r.add_argument("--concurrency", type=int, default=32)
    r.add_argument("--batch", type=int, default=10_000)
    r.add_argument("--max-growth", type=float, default=10.0, help="RSS growth allowed, %%")
    k = sub.add_parser("kill", help="real vLLM (CPU): a model killed every K seconds under load")
    k.add_argument("--minutes", type=float, default=5)
    k.add_argument("--every", type=float, default=60)
    k.add_argument("--clients", type=int, default=4)
    k.add_argument("--models", type=int, default=2, choices=[1, 2])
    k.add_argument("--hang", type=float, default=180, help="seconds after which an open request is a hang")
    for p in (s, r, k):
        p.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    return {"streams": cmd_streams, "requests": cmd_requests, "kill": cmd_kill}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
