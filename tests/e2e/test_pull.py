"""Issue 6 end to end: models from a (local, fake) Hugging Face Hub into the cache, served by real vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from fakehub import FakeHub

from .harness import Server, free_port, state_processes, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
               tiny_model_b: Path) -> Iterator[tuple[Server, FakeHub, dict[str, str]]]:
    root = tmp_path_factory.mktemp("pull")
    with FakeHub() as hub:
        hub.add_repo("vllama-test/tiny", {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
        hub.add_repo("vllama-test/tiny-b", {p.name: p.read_bytes() for p in tiny_model_b.iterdir() if p.is_file()})
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(root / "hub"), "HF_HOME": str(root / "home"),
               "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
        cfg = write_config(root / "models.yaml", [
            # Not in the cache: `vllama serve` pulls it before launching (auto_pull, the default).
            {"name": "pulled", "source": "vllama-test/tiny", "max_model_len": 1024},
            # Not in the cache and auto_pull off: reported missing until someone pulls it.
            {"name": "manual", "source": "vllama-test/tiny-b", "max_model_len": 1024,
             "auto_pull": False, "load": "on_demand"},
        ])
        srv = Server(config_path=cfg, state_dir=root / "run", port=free_port(), env=env)
        srv.start()
        try:
            srv.wait_ready(["pulled"])
            yield srv, hub, env
        finally:
            srv.stop()
            assert state_processes(srv.state_dir) == []


def test_auto_pull_then_serve_from_the_cache(hub_server: tuple[Server, FakeHub, dict[str, str]]) -> None:
    srv, _, env = hub_server
    snapshots = list(Path(env["HF_HUB_CACHE"]).glob("models--vllama-test--tiny/snapshots/*/model.safetensors"))
    assert len(snapshots) == 1
    r = ollama.Client(host=srv.url).generate(model="pulled", prompt="hi", options={"num_predict": 4})
    assert r.done and r.eval_count == 4
    # vLLM got the repo id and read the cache; the program says so.
    (conf_file,) = (srv.state_dir / "programs").glob("vllm-pulled_latest-*.conf")
    conf = conf_file.read_text()
    assert "--model vllama-test/tiny " in conf and 'HF_HUB_OFFLINE="1"' in conf


def test_missing_model_then_pull_with_ollama_progress_then_serve(
        hub_server: tuple[Server, FakeHub, dict[str, str]]) -> None:
    srv, hub, _ = hub_server
    client = ollama.Client(host=srv.url)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="manual", prompt="hi")
    assert e.value.status_code == 404 and "vllama pull manual" in str(e.value)
    assert httpx.get(srv.url + "/vllama/models/manual").json()["state"] == "missing"
    tags = {m["name"]: m for m in httpx.get(srv.url + "/api/tags").json()["models"]}
    assert tags["manual:latest"]["download"] == "not downloaded"
    assert tags["pulled:latest"]["download"] == "downloaded" and tags["pulled:latest"]["size"] > 0

    events = list(client.pull("manual", stream=True))
    statuses = [ev.status for ev in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    weights = [ev for ev in events if ev.status == "pulling model.safetensors"]
    size = len(hub.repos["vllama-test/tiny-b"].files["model.safetensors"].data)
    assert weights and weights[-1].completed == weights[-1].total == size
    assert all(ev.digest.startswith("sha256:") for ev in weights)

    r = client.generate(model="manual", prompt="hi", options={"num_predict": 3})
    assert r.done and r.eval_count == 3


def test_delete_is_refused_while_running_then_frees_the_cache(
        hub_server: tuple[Server, FakeHub, dict[str, str]]) -> None:
    srv, _, env = hub_server
    r = httpx.request("DELETE", srv.url + "/api/delete", json={"model": "pulled"})
    assert r.status_code == 409 and "stop it first" in r.json()["error"]
    assert httpx.post(srv.url + "/vllama/models/pulled/stop", timeout=60).json()["state"] == "stopped"
    r = httpx.request("DELETE", srv.url + "/api/delete", json={"model": "pulled"})
    assert r.status_code == 200, r.text
    assert not list(Path(env["HF_HUB_CACHE"]).glob("models--vllama-test--tiny/snapshots/*/model.safetensors"))
    r = httpx.request("DELETE", srv.url + "/api/delete", json={"model": "pulled"})
    assert r.status_code == 404


def test_cli_pull_of_a_bare_repo_id(hub_server: tuple[Server, FakeHub, dict[str, str]], tmp_path: Path) -> None:
    _, _, env = hub_server
    cache = tmp_path / "cli-cache"
    res = subprocess.run([sys.executable, "-m", "router.cli", "pull", "vllama-test/tiny-b"],
                         env={**os.environ, **env, "HF_HUB_CACHE": str(cache)}, capture_output=True, text=True, check=False,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "success" in res.stdout
    assert list(cache.glob("models--vllama-test--tiny-b/snapshots/*/model.safetensors"))
    bad = subprocess.run([sys.executable, "-m", "router.cli", "pull", "vllama-test/nope"],
                         env={**os.environ, **env, "HF_HUB_CACHE": str(cache)}, capture_output=True, text=True, check=False,
                         timeout=120)
    assert bad.returncode == 1 and "not found" in bad.stderr.lower()
