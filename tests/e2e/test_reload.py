"""Issue 7 end to end: editing models.yaml under load, on-demand models, keep_alive and eviction."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from .harness import Server, free_port, held_stream, state_processes, write_config

pytestmark = pytest.mark.e2e


def status(srv: Server) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(srv.url + "/vllama/models", timeout=10).json()}


def registered(srv: Server) -> set[str]:
    return {m["name"] for m in httpx.get(srv.url + "/api/tags", timeout=10).json()["models"]}


def wait_until(predicate, timeout: float = 240, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def generate(srv: Server, model: str, **extra: object) -> httpx.Response:
    return httpx.post(srv.url + "/api/generate", timeout=300, json={
        "model": model, "prompt": "hello", "stream": False, "options": {"num_predict": 4}, **extra})


class Traffic(threading.Thread):
    """Requests to some models in a loop; every failure is kept."""

    def __init__(self, srv: Server, models: list[str]) -> None:
        super().__init__(daemon=True)
        self.srv, self.models, self.ok, self.failures = srv, models, 0, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for m in self.models:
                try:
                    r = generate(self.srv, m)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append((m, r.status_code, r.text))
                except httpx.HTTPError as e:
                    self.failures.append((m, repr(e)))

    def stop(self) -> None:
        self.halt.set()
        self.join()


@pytest.fixture(scope="module")
def editable(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_model_b: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("reload")
    cfg = write_config(root / "models.yaml", [
        {"name": "r1", "source": str(tiny_model), "max_model_len": 1024},
        {"name": "r2", "source": str(tiny_model_b), "max_model_len": 1024},
        {"name": "lazy", "source": str(tiny_model), "max_model_len": 512, "load": "on_demand", "keep_alive": "4s"},
    ], server={"shutdown_grace": 120})  # a drain on a loaded CI box may outlast the default 30 s
    srv = Server(config_path=cfg, state_dir=root / "run", port=free_port())
    srv.start()
    try:
        srv.wait_ready(["r1", "r2"])
        yield srv
    finally:
        srv.stop()
        assert state_processes(srv.state_dir) == []


def edit(srv: Server, change) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(srv.config_path.read_text())
    change(data)
    srv.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_on_demand_model_starts_on_first_request_and_stops_after_keep_alive(editable: Server) -> None:
    assert status(editable)["lazy:latest"]["state"] == "stopped"
    assert generate(editable, "lazy").status_code == 200  # waited while it started
    s = status(editable)["lazy:latest"]
    assert s["state"] == "ready" and s["expires_at"] is not None
    ps = httpx.get(editable.url + "/api/ps").json()["models"]
    assert "lazy:latest" in {m["name"] for m in ps}
    wait_until(lambda: status(editable)["lazy:latest"]["state"] == "stopped", timeout=30)


def test_keep_alive_zero_unloads_at_once(editable: Server) -> None:
    assert generate(editable, "lazy").status_code == 200
    r = httpx.post(editable.url + "/api/generate", json={"model": "lazy", "keep_alive": 0}, timeout=60)
    assert r.json()["done_reason"] == "unload"
    wait_until(lambda: status(editable)["lazy:latest"]["state"] == "stopped", timeout=15)


def test_adding_a_model_leaves_the_others_untouched(editable: Server, tiny_model: Path) -> None:
    before = status(editable)
    traffic = Traffic(editable, ["r1", "r2"])
    traffic.start()
    edit(editable, lambda d: d["models"].append({"name": "r3", "source": str(tiny_model), "max_model_len": 3072}))
    wait_until(lambda: status(editable).get("r3:latest", {}).get("state") == "ready")
    assert generate(editable, "r3").status_code == 200
    traffic.stop()
    after = status(editable)
    assert traffic.failures == [] and traffic.ok > 0
    for name in ("r1:latest", "r2:latest"):
        assert after[name]["pid"] == before[name]["pid"] and after[name]["restarts"] == 0


def test_a_broken_file_changes_nothing_and_is_reported(editable: Server) -> None:
    before = status(editable)
    text = editable.config_path.read_text()
    editable.config_path.write_text(text + "\n  - name: [unclosed\n")
    try:
        err = wait_until(lambda: httpx.get(editable.url + "/vllama/config").json()["reload_error"], timeout=20)
        assert "invalid registry" in err
        r = httpx.post(editable.url + "/vllama/reload")
        assert r.status_code == 400 and "invalid" in r.json()["error"]
        assert {n: m["pid"] for n, m in status(editable).items()} == {n: m["pid"] for n, m in before.items()}
        assert generate(editable, "r1").status_code == 200
    finally:
        editable.config_path.write_text(text)
    wait_until(lambda: httpx.get(editable.url + "/vllama/config").json()["reload_error"] is None, timeout=20)


def test_changing_one_model_restarts_only_it_and_aliases_apply_at_once(editable: Server) -> None:
    before = status(editable)
    traffic = Traffic(editable, ["r1", "r2"])
    traffic.start()

    def change(d: dict) -> None:
        for m in d["models"]:
            if m["name"] == "r2":
                m["max_model_len"] = 512
            if m["name"] == "r1":
                m["aliases"] = ["first"]
    edit(editable, change)
    wait_until(lambda: status(editable)["r2:latest"]["pid"] not in (None, before["r2:latest"]["pid"])
               and status(editable)["r2:latest"]["state"] == "ready")
    assert generate(editable, "first").status_code == 200  # the new alias
    traffic.stop()
    assert traffic.failures == [], traffic.failures[:3]  # rolling: the old r2 served until the new was ready
    after = status(editable)
    assert after["r1:latest"]["pid"] == before["r1:latest"]["pid"]
    assert after["r3:latest"]["pid"] == before["r3:latest"]["pid"]
    wait_until(lambda: not alive(before["r2:latest"]["pid"]), timeout=60)  # the old server was drained, stopped
    r = httpx.post(editable.url + "/v1/chat/completions", json={
        "model": "r2", "messages": [{"role": "user", "content": "x " * 600}], "max_tokens": 1})
    assert r.status_code == 400  # the new max_model_len (512) is in force


def test_removing_a_model_drains_then_stops_it(editable: Server) -> None:
    pid = status(editable)["r3:latest"]["pid"]
    applied = editable.log_path.read_text().count("reload applied")  # type: ignore[union-attr]
    # ignore_eos keeps the random test model from stopping early.
    body = {"model": "r3", "prompt": "story", "max_tokens": 3000, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with held_stream(editable.url, "r3", "/v1/completions", body) as t:  # r3 cannot finish before the reload lands
        edit(editable, lambda d: d.update(models=[m for m in d["models"] if m["name"] != "r3"]))
        # The reload applied, its supervisord update included (the log line comes after it).
        wait_until(lambda: editable.log_path.read_text().count("reload applied") > applied, timeout=30)  # type: ignore[union-attr]
        assert "r3:latest" not in registered(editable)
        assert generate(editable, "r3").status_code == 404  # no new requests for it...
        time.sleep(1)  # time enough to begin stopping r3, were the drain not waiting for its request
        stops = re.findall(r"r3:latest: \w+ → stopping", editable.log_path.read_text())  # type: ignore[union-attr]
        assert stops == [] and t.is_alive(), t  # ...but the one in flight still runs
    t.join(120)
    assert t.lines and (t.lines[-1].get("usage") or {}).get("completion_tokens") == 3000, t  # drained, not cut
    wait_until(lambda: "r3:latest" not in status(editable) and not alive(pid), timeout=60)


def test_eviction_keeps_at_most_two_of_three(tmp_path: Path, tiny_model: Path, tiny_model_b: Path) -> None:
    """Budgets that fit two models: requests alternating among three all succeed, never three at once."""
    mem = psutil.virtual_memory()
    # Leave room for exactly two 3.5 GiB budgets (not three) next to whatever else runs now.
    capacity_gib = 8.5
    reserve = max(0.0, mem.available / 2**30 - capacity_gib)
    models = [{"name": f"e{i}", "source": str(tiny_model if i % 2 else tiny_model_b), "max_model_len": 512,
               "load": "on_demand", "memory_gb": 3.5, "keep_alive": "10m"} for i in range(3)]
    cfg = write_config(tmp_path / "models.yaml", models, server={"reserve_gb": round(reserve, 2)})
    srv = Server(config_path=cfg, state_dir=tmp_path / "run", port=free_port())
    srv.start()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            n = sum("vllm.entrypoints" in " ".join(p.cmdline()) for p in state_processes(srv.state_dir))
            peak[0] = max(peak[0], n)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        srv.wait_listening()
        sampler.start()
        codes = [generate(srv, f"e{i % 3}").status_code for i in range(5)]
        assert codes == [200] * 5
        assert "evicted to make room for" in srv.log()
    finally:
        stop.set()
        srv.stop()
    assert peak[0] == 2
    assert state_processes(srv.state_dir) == []
