"""Issue 3 end to end: every Ollama endpoint and option family, through the official ollama
client, against real vLLM (CPU) serving the tiny random-weight Llama.

The client's own response models check field names and types. What the tiny
model cannot show (tool calls, thinking) is covered against a fake vLLM in
tests/test_service.py; here the tool *history* (an assistant call and its
result) goes to real vLLM, to prove vLLM accepts it as translated.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from .harness import Server, vllm_port

pytestmark = pytest.mark.e2e

RFC3339_NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")


def vllm_url(server: Server, model: str) -> str:
    return f"http://127.0.0.1:{vllm_port(server, model)}"


def running(server: Server, model: str) -> float:
    """vLLM's own count of requests it is generating for."""
    text = httpx.get(vllm_url(server, model) + "/metrics", timeout=5).text
    m = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, "vllm:num_requests_running missing from /metrics"
    return float(m.group(1))


def wait_for(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


@pytest.fixture
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


GREEDY = {"temperature": 0, "num_predict": 16}


# --- generate --------------------------------------------------------------------------------------


def test_generate_stream_and_not(client: ollama.Client) -> None:
    chunks = list(client.generate(model="tiny-a", prompt="Tell me a story", stream=True, options=GREEDY))
    assert all(RFC3339_NANO.fullmatch(c.created_at) for c in chunks)
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    final = chunks[-1]
    assert final.done_reason == "length" and final.eval_count == 16 and final.prompt_eval_count > 0
    assert final.total_duration >= final.load_duration >= 0 and final.eval_duration > 0
    assert final.prompt_eval_duration > 0
    assert final.context and len(final.context) == final.prompt_eval_count + final.eval_count
    whole = client.generate(model="tiny-a", prompt="Tell me a story", options=GREEDY)
    assert whole.response == "".join(c.response for c in chunks)
    assert whole.done and whole.eval_count == 16 and whole.context == final.context


@pytest.mark.parametrize("n", [1, 5, 23])
def test_num_predict_gives_exactly_that_eval_count(client: ollama.Client, n: int) -> None:
    opts = {"temperature": 0.9, "seed": 7, "num_predict": n}
    assert client.generate(model="tiny-b", prompt="count", options=opts).eval_count == n
    chunks = list(client.chat(model="tiny-b", messages=[{"role": "user", "content": "count"}], stream=True,
                              options=opts))
    assert chunks[-1].eval_count == n and chunks[-1].done_reason == "length"


def test_stop_string_is_respected(client: ollama.Client) -> None:
    prompt = "Write a long list"
    full = client.generate(model="tiny-a", prompt=prompt, options={"temperature": 0, "num_predict": 40}).response
    m = re.search(r"[A-Za-z]{3,}", full[4:])
    assert m, f"no word to stop at in {full!r}"
    stop = m.group(0)
    cut = client.generate(model="tiny-a", prompt=prompt, options={"temperature": 0, "num_predict": 40,
                                                                  "stop": [stop]})
    assert cut.done_reason == "stop"
    assert cut.response == full[:full.index(stop)]
    assert stop not in cut.response


def test_seed_and_temperature_are_reproducible(client: ollama.Client) -> None:
    def run(seed: int) -> str:
        return client.generate(model="tiny-a", prompt="Surprise me", options={
            "temperature": 1.0, "seed": seed, "num_predict": 24}).response

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_format_schema_returns_json_that_validates(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    # Greedy, the random model loops on whitespace (JSON allows it); sampled with a seed, it finishes.
    for seed in (1, 2, 3):
        r = client.chat(model="tiny-a", messages=[{"role": "user", "content": "Is it ok?"}], format=schema,
                        options={"temperature": 1, "seed": seed, "num_predict": 300})
        assert r.done_reason == "stop", f"the random model did not finish its JSON: {r.message.content!r}"
        jsonschema.validate(json.loads(r.message.content), schema)
    enum = {"type": "string", "enum": ["yes", "no"]}
    g = client.generate(model="tiny-b", prompt="yes or no?", format=enum, options={"temperature": 0})
    jsonschema.validate(json.loads(g.response), enum)


def test_format_json_is_json_mode(client: ollama.Client) -> None:
    r = client.generate(model="tiny-a", prompt="json please", format="json", options={"num_predict": 8})
    assert r.response.lstrip().startswith("{")  # the grammar allows nothing else (8 tokens: maybe unfinished)


def test_raw_goes_to_the_model_as_is(client: ollama.Client, server: Server) -> None:
    direct = httpx.post(vllm_url(server, "tiny-a") + "/v1/completions", json={
        "model": "tiny-a:latest", "prompt": "<|im_start|>user\nhi", "max_tokens": 8, "temperature": 0},
        timeout=60).json()
    r = client.generate(model="tiny-a", prompt="<|im_start|>user\nhi", raw=True,
                        options={"temperature": 0, "num_predict": 8})
    assert r.response == direct["choices"][0]["text"]
    assert r.prompt_eval_count == direct["usage"]["prompt_tokens"]
    assert r.context is None  # not in raw mode


def test_system_and_template(client: ollama.Client) -> None:
    with_system = client.generate(model="tiny-a", prompt="hi", system="You are a pirate.", options=GREEDY)
    plain = client.generate(model="tiny-a", prompt="hi", options=GREEDY)
    assert with_system.prompt_eval_count > plain.prompt_eval_count
    templated = client.generate(model="tiny-a", prompt="hi", template="Q: {{ .Prompt }}\nA:", options=GREEDY)
    assert templated.eval_count == 16 and templated.prompt_eval_count < plain.prompt_eval_count


def test_context_continues_a_conversation(client: ollama.Client) -> None:
    first = client.generate(model="tiny-a", prompt="My name is Ann.", options=GREEDY)
    second = client.generate(model="tiny-a", prompt="What is my name?", context=first.context, options=GREEDY)
    alone = client.generate(model="tiny-a", prompt="What is my name?", options=GREEDY)
    # The earlier exchange is part of the prompt: its tokens, then the new turn (BOS not repeated).
    assert second.prompt_eval_count == len(first.context) + alone.prompt_eval_count - 1
    assert second.context[:len(first.context)] == first.context


def test_load_and_unload(client: ollama.Client) -> None:
    r = client.generate(model="tiny-a", prompt="")
    assert (r.done, r.done_reason, r.response) == (True, "load", "")
    assert client.chat(model="alpha", messages=[]).done_reason == "load"


# --- chat ----------------------------------------------------------------------------------------------


def test_chat_stream_token_by_token(client: ollama.Client) -> None:
    chunks = list(client.chat(model="tiny-b", messages=[{"role": "system", "content": "Be nice."},
                                                        {"role": "user", "content": "Hello"}],
                              stream=True, options={"temperature": 0, "num_predict": 20}))
    assert 1 <= len(chunks) - 1 <= 20  # one line per chunk vLLM sent (it may send several tokens at once)
    assert all(c.message.role == "assistant" for c in chunks)
    final = chunks[-1]
    assert final.done and final.eval_count == 20 and final.message.content == ""
    whole = client.chat(model="tiny-b", messages=[{"role": "system", "content": "Be nice."},
                                                  {"role": "user", "content": "Hello"}],
                        options={"temperature": 0, "num_predict": 20})
    assert whole.message.content == "".join(c.message.content for c in chunks)


def test_tool_history_round_trips_to_vllm(client: ollama.Client) -> None:
    """An assistant's tool call and the tool's result, as the ollama client sends them back,
    are rendered by vLLM's chat template (the tiny model has no tool parser, so it never
    *makes* a call: that side is tested against a fake vLLM in tests/test_service.py)."""
    base = [{"role": "user", "content": "Weather in Tokyo?"}]
    history = base + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "content": "sunny, 25C", "tool_name": "get_weather"},
    ]
    without = client.chat(model="tiny-a", messages=base, options=GREEDY)
    with_tools = client.chat(model="tiny-a", messages=history, options=GREEDY)
    assert with_tools.prompt_eval_count > without.prompt_eval_count + 10  # the call and result are in the prompt
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny-a", messages=base, tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}])
    assert e.value.status_code == 400 and "does not support tools" in e.value.error


def test_logprobs(client: ollama.Client) -> None:
    r = client.chat(model="tiny-a", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3,
                    options={"temperature": 0, "num_predict": 4})
    assert len(r.logprobs) == 4
    assert all(len(lp.top_logprobs) == 3 for lp in r.logprobs)
    assert all(lp.logprob <= 0 for lp in r.logprobs)
    chunks = list(client.generate(model="tiny-a", prompt="hi", raw=True, logprobs=True, top_logprobs=2,
                                  stream=True, options={"temperature": 0, "num_predict": 3}))
    lps = [lp for c in chunks for lp in c.logprobs or ()]
    assert len(lps) == 3 and all(len(lp.top_logprobs) >= 1 for lp in lps)


def test_every_option_family_is_accepted_by_vllm(client: ollama.Client) -> None:
    r = client.generate(model="tiny-b", prompt="options", options={
        "num_predict": 6, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 0.9,
        "seed": 1, "stop": ["\n\n\n"], "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.3,
        "frequency_penalty": 0.3, "num_ctx": 1024, "num_gpu": 1, "num_thread": 2, "mirostat": 0,
        "num_batch": 8, "num_keep": 4, "use_mmap": True, "tfs_z": 1.0})
    assert r.done and r.eval_count <= 6
    # More context than the model is served with: used as far as it goes, as Ollama clamps it.
    assert client.generate(model="tiny-b", prompt="x", options={"num_ctx": 4096, "num_predict": 2}).done
    greedy = client.generate(model="tiny-b", prompt="repeat", options={"temperature": 0, "num_predict": 30})
    penalised = client.generate(model="tiny-b", prompt="repeat", options={"temperature": 0, "num_predict": 30,
                                                                          "repeat_penalty": 2.0})
    assert greedy.response != penalised.response  # repetition_penalty reached the sampler


def test_a_chat_longer_than_the_context_loses_its_oldest_messages(client: ollama.Client, server: Server) -> None:
    """As Ollama: the system message and the latest message stay, the oldest turns go (tiny-a: 1024 tokens)."""
    turn = " ".join(["weather sunny breeze tomorrow clouds"] * 30)
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {turn}"} for i in range(20)]
    messages = [{"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "and now?"}]
    r = client.chat(model="tiny-a", messages=messages, options={"temperature": 0, "num_predict": 4})
    assert r.done and r.eval_count == 4
    assert 0 < r.prompt_eval_count <= 1024 - 4  # the rest of the conversation fitted beside the answer
    whole = httpx.post(server.url + "/api/chat", timeout=120, json={
        "model": "tiny-a", "messages": messages, "stream": False, "truncate": False,
        "options": {"num_predict": 4}})
    assert whole.status_code == 400 and "exceeds the context length" in whole.json()["error"]


def test_think_on_a_model_without_reasoning(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny-a", messages=[{"role": "user", "content": "x"}], think=True)
    assert e.value.status_code == 400 and e.value.error == '"tiny-a" does not support thinking'
    assert client.chat(model="tiny-a", messages=[{"role": "user", "content": "x"}], think=False,
                       options={"num_predict": 1}).done


# --- embeddings (a second server: the tiny model with --runner pooling) ------------------------------


def test_embed(embed_server: Server) -> None:
    client = ollama.Client(host=embed_server.url)
    r = client.embed(model="tiny-embed", input=["The sky is blue", "Grass is green"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 256
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in r.embeddings)
    assert r.embeddings[0] != r.embeddings[1]
    assert r.prompt_eval_count > 0 and r.total_duration > 0
    single = client.embed(model="tiny-embed", input="The sky is blue")
    assert single.embeddings[0] == pytest.approx(r.embeddings[0], abs=1e-5)
    cut = client.embed(model="tiny-embed", input="The sky is blue", dimensions=64)
    assert len(cut.embeddings[0]) == 64 and abs(sum(x * x for x in cut.embeddings[0]) - 1) < 1e-4
    legacy = client.embeddings(model="tiny-embed", prompt="The sky is blue")
    assert len(legacy.embedding) == 256
    direct = httpx.post(vllm_url(embed_server, "tiny-embed") + "/v1/embeddings", json={
        "model": "tiny-embed:latest", "input": "The sky is blue"}, timeout=60).json()
    assert single.embeddings[0] == pytest.approx(direct["data"][0]["embedding"], abs=1e-4)
    long = client.embed(model="tiny-embed", input="word " * 3000)  # truncate (default true)
    assert len(long.embeddings[0]) == 256 and long.prompt_eval_count <= 1024
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny-embed", input="word " * 3000, truncate=False)
    assert e.value.status_code == 400


def test_generative_model_does_not_embed(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny-a", input="x")
    assert e.value.status_code == 400 and "does not support embeddings" in e.value.error


# --- listing ---------------------------------------------------------------------------------------------


def test_tags(client: ollama.Client, tiny_model: Any) -> None:
    models = {m.model: m for m in client.list().models}
    a = models["tiny-a:latest"]
    assert a.size == sum(p.stat().st_size for p in tiny_model.iterdir() if p.is_file())
    assert re.fullmatch(r"[0-9a-f]{64}", a.digest)
    assert a.details.format == "safetensors" and a.details.family == "llama" and a.details.families == ["llama"]
    assert re.fullmatch(r"\d+(\.\d+)?M", a.details.parameter_size)
    from router import modelinfo

    assert a.details.quantization_level == modelinfo.weights_dtype(tiny_model)  # the safetensors dtype, e.g. F16
    assert a.modified_at is not None


def test_show(server: Server, client: ollama.Client, tiny_model: Any) -> None:
    from router.devtools import TINY_CHAT_TEMPLATE

    cfg = json.loads((tiny_model / "config.json").read_text())
    s = client.show("alpha")
    assert s.capabilities == ["completion"]
    assert s.template == TINY_CHAT_TEMPLATE
    info = s.modelinfo
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == cfg["max_position_embeddings"]
    assert info["llama.embedding_length"] == cfg["hidden_size"]
    assert info["llama.block_count"] == cfg["num_hidden_layers"]
    assert info["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert info["general.parameter_count"] > 0
    assert "num_ctx" in s.parameters
    assert s.details.family == "llama"
    verbose = httpx.post(server.url + "/api/show", json={"model": "tiny-a", "verbose": True}, timeout=30).json()
    assert verbose["tensors"] and {"name", "type", "shape"} <= set(verbose["tensors"][0])


def test_ps(client: ollama.Client) -> None:
    ps = {m.model: m for m in client.ps().models}
    assert {"tiny-a:latest", "tiny-b:latest"} <= set(ps)
    a = ps["tiny-a:latest"]
    assert a.context_length == 1024
    assert a.size and a.size > 100 * 1024 * 1024  # the vLLM process tree's resident memory, measured
    assert a.size_vram == 0  # CPU mode
    assert a.expires_at.year > 2200  # `always` models never expire
    assert a.details.family == "llama"


def test_version_root_and_refusals(server: Server, client: ollama.Client) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", httpx.get(server.url + "/api/version").json()["version"])
    assert httpx.get(server.url + "/").text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200
    with pytest.raises(ollama.ResponseError, match="models.yaml"):
        client.copy("tiny-a", "tiny-c")
    with pytest.raises(ollama.ResponseError, match="models.yaml"):
        client.create(model="x", from_="tiny-a")
    with pytest.raises(ollama.ResponseError, match="does not push"):
        client.push("tiny-a")


def test_errors(server: Server, client: ollama.Client) -> None:
    def post(path: str, content: bytes) -> httpx.Response:
        return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})

    assert post("/api/chat", b"").json() == {"error": "missing request body"}
    r = post("/api/generate", b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("invalid JSON")
    r = post("/api/generate", b'{"model": "tiny-a", "prompt": 5}')
    assert (r.status_code, r.json()) == (400, {"error": "prompt: Expected `str | null`, got `int`"})
    assert post("/api/chat", b'{"messages": []}').json() == {"error": "model is required"}
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="missing-model", prompt="x")
    assert e.value.status_code == 404 and "not found" in e.value.error


# --- cancellation ----------------------------------------------------------------------------------------


def generated(server: Server, model: str) -> float:
    text = httpx.get(vllm_url(server, model) + "/metrics", timeout=5).text
    return float(re.search(r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE).group(1))


def settled(server: Server, model: str) -> float:
    """vLLM's generated-token counter once it stops moving."""
    last = generated(server, model)
    while True:
        time.sleep(0.5)
        now = generated(server, model)
        if now == last:
            return now
        last = now


# A long generation: greedy (the tiny model then never emits EOS before the context is full), with
# 20 top logprobs per token to slow vLLM down. Even so it writes the ~1000 tokens in 0.2-3 s, and
# on this CPU build its first chunks sometimes leave only once it is done (its API server starved by
# the engine): such a try shows nothing about cancellation and is repeated.
LONG = {"model": "tiny-b", "logprobs": True, "top_logprobs": 20, "options": {"num_predict": 2000, "temperature": 0}}


@pytest.fixture(scope="module")
def full_length(server: Server) -> int:
    """How many tokens the long generation makes when nobody hangs up."""
    before = settled(server, "tiny-b")
    r = httpx.post(server.url + "/api/chat", timeout=120, json={
        **LONG, "stream": False, "messages": [{"role": "user", "content": "Go on"}]}).json()
    assert r["done_reason"] == "length"
    assert settled(server, "tiny-b") - before == r["eval_count"]
    return r["eval_count"]


def test_client_disconnect_stops_vllm(server: Server, full_length: int) -> None:
    """Read a few chunks, hang up: vLLM must stop (its running gauge drops to 0) well before the end.

    The client waits at most 0.5 s for each chunk: when vLLM's first chunks are late (see above),
    it hangs up while the router still waits for them, which must abort vLLM all the same.
    """
    aborted = []
    for _attempt in range(5):
        assert wait_for(lambda: running(server, "tiny-b") == 0, 5)
        before = settled(server, "tiny-b")
        lines = 0
        try:
            with httpx.stream("POST", server.url + "/api/chat", timeout=httpx.Timeout(60, read=0.5), json={
                    **LONG, "messages": [{"role": "user", "content": "Go on"}]}) as r:
                for _line in r.iter_lines():
                    lines += 1
                    if lines == 3:
                        break
        except httpx.TimeoutException:
            pass  # hung up before the stream began
        assert wait_for(lambda: running(server, "tiny-b") == 0, 3), "vLLM kept generating after the client left"
        made = settled(server, "tiny-b") - before
        if made >= full_length:
            continue  # vLLM had finished before we could hang up (its output came late): try again
        aborted.append(lines)
        if lines == 3:
            return  # hung up mid-stream, and vLLM stopped
    assert aborted, "in 5 tries vLLM finished every generation: the client's hang-up never aborted it"


def test_client_disconnect_during_a_non_streamed_request_stops_vllm(server: Server, full_length: int) -> None:
    for _attempt in range(5):
        assert wait_for(lambda: running(server, "tiny-b") == 0, 5)
        before = settled(server, "tiny-b")
        try:
            httpx.post(server.url + "/api/chat", timeout=0.5, json={
                **LONG, "stream": False, "messages": [{"role": "user", "content": "Go on"}]})
        except httpx.TimeoutException:
            if settled(server, "tiny-b") - before < full_length:
                return  # vLLM stopped when the client left
        # Answered, or finished anyway (it may end before its answer leaves): try again.
    pytest.fail("in 5 tries vLLM finished every generation: the client's hang-up never aborted it")
