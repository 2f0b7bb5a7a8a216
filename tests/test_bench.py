"""The benchmark suite itself (load_tests/), exercised for a few seconds against its fake vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from load_tests import bench, client
from load_tests.fake_upstream import FakeVLLM, Settings


def test_overhead_mode_direct_writes_sensible_json(tmp_path: Path) -> None:
    """`overhead --no-router --no-litellm --floor`: the fake upstream alone, and the bare relays
    of load_tests/floor.py in front of it in the open-streams run; ~5 seconds of load."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "load_tests.bench", "overhead", "--no-router", "--no-litellm",
         "--seconds", "0.6", "--repeats", "1", "--levels", "1,20", "--latency-requests", "100",
         "--stream-tokens", "64", "--rss-streams", "50", "--paced-rate", "40", "--paced-seconds", "0.5",
         "--floor", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("overhead-*.json"))
    assert len(files) == 1, proc.stdout
    doc = json.loads(files[0].read_text())
    assert doc["mode"] == "overhead" and doc["machine"]["cores"] >= 1
    lat = {(r["stream"]): r for r in doc["latency"]}
    for stream in (False, True):
        r = lat[stream]
        assert r["target"] == "fake direct" and r["errors"] == 0 and r["requests"] == 100
        assert r["tokens_per_req"] == 16  # forced count from the usage numbers
        assert 0 < r["lat_p50_ms"] < 100 and 0 < r["ttft_p50_ms"] <= r["lat_p99_ms"]
    thr = doc["throughput"]
    assert [r["concurrency"] for r in thr] == [1, 20]
    for r in thr:
        assert r["errors"] == 0 and r["tokens_per_req"] == 64
        # every token is one SSE event (+ the role and usage events): chunks ≈ tokens
        assert r["chunks_s"] >= r["tok_s"] > 1000
    rss = {r["target"]: r for r in doc["rss"]}
    assert list(rss) == ["floor: tcp relay", "floor: asgi relay", "floor: litestar relay", "fake direct"]
    for r in rss.values():
        assert r["streams"] == 50 and r["errors"] == 0 and r["offered_chunks_s"] == 2000
        # every stream came through whole (the usage count checked by the client), each at ~40 tokens/s
        assert r["chunks_s"] > 1000
        assert 0 < r["cpu_us_per_chunk"] < 10_000  # the relay's (or the fake's own) CPU per token
    assert doc["summary"][0]["target"] == "fake direct"
    png = files[0].with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png.exists() and png.stat().st_size > 1000


async def test_client_parses_both_apis_against_the_fake() -> None:
    """The load client's numbers for every API shape: ollama-style parsing is checked on hand-made bodies."""
    fake = FakeVLLM(Settings(model="m"))
    port = await fake.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for endpoint in ("chat", "completions"):
            for stream in (True, False):
                t = client.Target("t", url, "openai", endpoint, "m")
                b = await client.run_batch(t, 3, requests=7, max_tokens=5, stream=stream)
                assert len(b.results) == 7 and b.wall > 0
                for r in b.results:
                    assert r.ok and r.status == 200 and r.output_tokens == 5 and r.prompt_tokens > 0, r
                    assert r.ttft is not None and 0 < r.ttft <= r.latency
                    if stream:  # role chunk (chat) + 5 tokens + usage + [DONE]
                        assert r.chunks == 5 + 2 + (endpoint == "chat")
        bad = client.Target("t", url + "/nope", "openai", "chat", "m")
        b = await client.run_batch(bad, 1, requests=1, max_tokens=5, stream=False)
        assert not b.results[0].ok and b.results[0].status == 404
        row = bench.summarize([b])
        assert row.errors == 1 and row.first_error
    finally:
        await fake.close()


def test_parse_ollama_bodies() -> None:
    enc = msgspec.json.encode
    lines = b"".join(enc(x) + b"\n" for x in [
        {"model": "m", "response": "a", "done": False},
        {"model": "m", "response": "", "done": True, "eval_count": 9, "prompt_eval_count": 4},
    ])
    assert client.parse("ollama", True, lines, 2) == (9, 4, 2, None)
    assert client.parse("ollama", False, enc({"done": True, "eval_count": 3, "prompt_eval_count": 1}), 0) \
        == (3, 1, 1, None)
    err = client.parse("ollama", True, enc({"response": "a"}) + b"\n" + enc({"error": "boom"}) + b"\n", 2)
    assert err[3] == "boom"


def test_stats() -> None:
    assert bench.pct([], 50) is None
    assert bench.pct([3.0], 99) == 3.0
    assert bench.pct([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert bench.pct(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_side_by_side_ratios_carry_their_per_repeat_spread_and_a_pooled_mean() -> None:
    def batch(name: str, tokens: int, wall: float) -> client.Batch:
        return client.Batch(name, 10, True, wall, [client.Result(ok=True, status=200, latency=wall, ttft=None, output_tokens=tokens)])

    router = bench.summarize([batch("vllama /v1", 100, 1.0), batch("vllama /v1", 90, 1.0)])
    direct = bench.summarize([batch("direct vLLM", 100, 1.0), batch("direct vLLM", 120, 1.0)])
    assert router.batch_tok_s == [100.0, 90.0]
    targets = [client.Target("vllama /v1", "", "openai", "chat", "m"), client.Target("direct vLLM", "", "openai", "chat", "m")]
    [r] = bench.side_ratios([router, direct], targets, [10], [True])
    assert r["throughput_vs_direct"] == round(190 / 220, 3)
    assert r["throughput_vs_direct_range"] == [0.75, 1.0]  # 90/120 and 100/100, each pair run side by side
    # The median of the pairs: one batch hit by the host's noise does not move it.
    noisy = bench.summarize([batch("vllama /v1", n, 1.0) for n in (100, 90, 10)])
    steady = bench.summarize([batch("direct vLLM", n, 1.0) for n in (100, 120, 100)])
    [m] = bench.side_ratios([noisy, steady], targets, [10], [True])
    assert m["throughput_vs_direct_median"] == 0.75  # of 1.0, 0.75 and 0.1
    assert m["throughput_vs_direct"] == 0.625
    more = [{**r, "concurrency": 50, "throughput_vs_direct": 0.5}, {**r, "throughput_vs_direct": 2.0}]
    assert bench.geomean_by_target(more) == [["vllama /v1", "yes", 2, 1.0, 0.5, 2.0]]


def test_side_by_side_ratios_say_what_the_router_itself_took() -> None:
    """The router's own CPU (its process, not its vLLMs) per batch: cores and µs per output token."""
    b = client.Batch("vllama /v1", 10, True, 2.0, [client.Result(ok=True, status=200, latency=2.0, ttft=None,
                                                                 output_tokens=1000)])
    router = bench.summarize([b], cpu_s=3.8, own_cpu_s=0.3)
    direct = bench.summarize([client.Batch("direct vLLM", 10, True, 2.0, b.results)])
    targets = [client.Target("vllama /v1", "", "openai", "chat", "m"), client.Target("direct vLLM", "", "openai", "chat", "m")]
    [r] = bench.side_ratios([router, direct], targets, [10], [True])
    assert r["router_cores"] == 0.15  # 0.3 CPU-s over 2 s of wall
    assert r["router_cpu_us_per_token"] == 300.0  # 0.3 s over 1,000 tokens
    assert bench.side_ratios([direct, direct], targets[1:], [10], [True]) == []


class _Pid:
    """Stands in for a harness.Proc: all the bench reads of one is its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


async def test_interleaved_waits_for_every_settling_server_before_each_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that is not measured (the serial vLLM) must still be idle before the next batch:
    a vLLM keeps a core busy for ~0.85 s after its last request."""
    waited: list[set[object]] = []

    async def quiesce(procs: set[object], **_: object) -> None:
        waited.append(set(procs))

    monkeypatch.setattr(bench, "quiesce", quiesce)
    fake = FakeVLLM(Settings(model="m"))
    port = await fake.start()
    try:
        url = f"http://127.0.0.1:{port}"
        targets = [client.Target(n, url, "openai", "chat", "m") for n in ("a", "b")]
        measured, serial = _Pid(os.getpid()), _Pid(os.getpid())
        rows = await bench.interleaved(targets, [2], [False], repeats=2, requests=lambda c: 2, max_tokens=3,
                                       cpu_of=lambda t: measured if t.name == "a" else None,  # type: ignore[arg-type,return-value]
                                       settle=[serial], log=False)  # type: ignore[list-item]
    finally:
        await fake.close()
    assert [r.target for r in rows] == ["a", "b"] and all(r.requests == 4 for r in rows)
    assert waited == [{measured, serial}] * 4  # before each of the 2 × 2 batches


def test_serving_cpus_are_the_cores_no_vllm_worker_is_bound_to() -> None:
    from load_tests.harness import serving_cpus

    assert serving_cpus({0, 1}, [{0}]) == {1}
    assert serving_cpus({0, 1, 2, 3}, [{0, 1}, {1}]) == {2, 3}
    assert serving_cpus({0, 1}, []) is None  # nothing bound: nothing to keep off
    assert serving_cpus({0, 1}, [{0}, {1}]) is None  # the workers hold every core


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to")
def test_keep_off_workers_moves_all_but_the_bound_worker_and_leaves_the_worker_alone(tmp_path: Path) -> None:
    """A server whose child is bound to one core (as vLLM binds its worker): the server and
    this process move to the other cores, the child keeps its core."""
    import psutil

    from load_tests import harness

    machine = set(os.sched_getaffinity(0))
    worker_core = min(machine)
    code = ("import os, subprocess, sys, time\n"
            f"w = subprocess.Popen([sys.executable, '-c', 'import os, time; os.sched_setaffinity(0, {{{worker_core}}}); "
            "print(1, flush=True); time.sleep(60)'], stdout=subprocess.PIPE)\n"
            "w.stdout.readline(); print('ready', flush=True); time.sleep(60)\n")
    server = harness.Proc("server", [sys.executable, "-c", code], tmp_path / "server.log").start()
    try:
        deadline = time.monotonic() + 20
        while "ready" not in server.tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        (worker,) = psutil.Process(server.pid).children()
        cpus = harness.keep_off_workers([server])
        assert cpus == machine - {worker_core}
        assert set(psutil.Process(server.pid).cpu_affinity()) == cpus
        assert set(os.sched_getaffinity(0)) == cpus
        assert worker.cpu_affinity() == [worker_core]
    finally:
        os.sched_setaffinity(0, machine)  # the rest of the suite keeps every core
        server.stop()


async def test_cores_mode_loads_every_model_at_once_and_counts_failures() -> None:
    """`cores`' load: both models at once through one URL; its tokens are the usage counts of all."""
    fake = FakeVLLM(Settings(model="m", rate=200))  # 200 tokens/s per stream: a known rate
    port = await fake.start()
    try:
        url = f"http://127.0.0.1:{port}"
        tokens, wall, errors = await bench.pair_load(url, ["a", "b"], conc=2, requests=4, max_tokens=20)
        assert (tokens, errors) == (2 * 4 * 20, 0)  # every request of both models, by its usage count
        assert wall >= 2 * 20 / 200 * 0.9  # at least two rounds of 20 tokens at 200/s: the whole load, timed
        tokens, wall, errors = await bench.pair_load(url + "/nope", ["a", "b"], conc=2, requests=4, max_tokens=20)
        assert (tokens, errors) == (0, 8)
    finally:
        await fake.close()
