"""The Ollama API and the pass-through routes over real HTTP, against a fake vLLM.

The router here is the real one (app, service, fleet, upstream) on its own
thread; the models point (``url``) at `FakeVLLM`, which answers in vLLM 0.32's
exact shapes. That lets these tests show what the tiny random model cannot:
tool calls, thinking, logprobs, failures mid-stream, a client hanging up. The
clients are the official ones (ollama, openai, anthropic), so their own
response models check our field names and types.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

try:  # tests/ is not a package today; keep working if it becomes one
    from .fake_vllm import FakeVLLM, RouterThread, Script, error, slow, text, thinking, tool_calls
except ImportError:
    from fake_vllm import FakeVLLM, RouterThread, Script, error, slow, text, thinking, tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVLLM]:
    with FakeVLLM("smart:latest", names=("plain:latest", "embedder:latest")) as f:
        yield f


@pytest.fixture(scope="module")
def router(fake: FakeVLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterThread]:
    dead = FakeVLLM().port  # nothing listens there
    registry = {"server": {"cold_start_timeout": 1}, "models": [
        {"name": "smart", "aliases": ["clever"], "source": "/nonexistent/smart", "url": fake.url,
         "max_model_len": 1024, "tool_call_parser": "hermes", "reasoning_parser": "deepseek_r1"},
        {"name": "plain", "source": "/nonexistent/plain", "url": fake.url, "max_model_len": 512},
        {"name": "embedder", "source": "/nonexistent/embedder", "url": fake.url, "embedding": True},
        {"name": "gone", "source": "/nonexistent/gone", "url": f"http://127.0.0.1:{dead}"},
    ]}
    r = RouterThread(registry).start()
    yield r
    r.stop()


@pytest.fixture
def client(router: RouterThread, fake: FakeVLLM) -> ollama.Client:
    fake.reset()
    return ollama.Client(host=router.url)


def post(router: RouterThread, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(router.url + path, content=content, headers={"content-type": "application/json"}, timeout=10)


def ndjson(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line]


# --- generate ---------------------------------------------------------------------------------


def test_generate_streams_token_by_token_with_usage_counts(client: ollama.Client, fake: FakeVLLM) -> None:
    chunks = list(client.generate(model="smart", prompt="hello there", stream=True, options={"num_predict": 4}))
    assert [c.response for c in chunks] == ["w0 ", "w1 ", "w2 ", "w3 ", ""]
    final = chunks[-1]
    assert final.done and final.done_reason == "length" and final.eval_count == 4
    assert final.prompt_eval_count == 3  # from vLLM's usage, never counted here
    assert final.context == [1, 2, 3, 200, 201, 202, 203]  # prompt + generated token ids
    assert final.total_duration >= final.eval_duration > 0
    assert fake.last()["max_tokens"] == 4


def test_generate_non_stream_is_one_object(client: ollama.Client) -> None:
    r = client.generate(model="smart", prompt="hi", options={"num_predict": 2})
    assert r.response == "w0 w1 " and r.done and r.done_reason == "length" and r.eval_count == 2
    assert r.context


def test_generate_with_context_continues_with_token_ids(client: ollama.Client, fake: FakeVLLM) -> None:
    first = client.generate(model="smart", prompt="one", options={"num_predict": 2})
    client.generate(model="smart", prompt="two three", context=first.context, options={"num_predict": 2})
    assert fake.requests[-2][0] == "/tokenize"
    path, body = fake.requests[-1]
    assert path == "/v1/completions"
    assert body["prompt"] == [*first.context, 100, 101]  # the new turn's BOS (1) dropped


def test_raw_generate_has_no_context(client: ollama.Client, fake: FakeVLLM) -> None:
    r = client.generate(model="smart", prompt="abc", raw=True, options={"num_predict": 1})
    assert fake.requests[-1][0] == "/v1/completions" and r.context is None


def test_empty_prompt_loads_and_keep_alive_0_unloads(client: ollama.Client) -> None:
    r = client.generate(model="smart", prompt="")
    assert r.done and r.done_reason == "load" and r.response == ""
    assert client.generate(model="smart", keep_alive=0).done_reason == "unload"
    c = client.chat(model="smart", messages=[])
    assert c.done_reason == "load" and c.message.role == "assistant"


def test_options_reach_vllm(client: ollama.Client, fake: FakeVLLM) -> None:
    client.generate(model="smart", prompt="x", options={
        "temperature": 0.2, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 3, "stop": ["w2"], "num_predict": 9,
        "repeat_penalty": 1.2, "presence_penalty": 0.1, "frequency_penalty": 0.2, "num_gpu": 1, "mirostat": 1,
        "typical_p": 0.7})
    body = fake.last()
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "max_tokens",
                                 "repetition_penalty", "presence_penalty", "frequency_penalty")} == {
        "temperature": 0.2, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 3, "stop": ["w2"], "max_tokens": 9,
        "repetition_penalty": 1.2, "presence_penalty": 0.1, "frequency_penalty": 0.2}
    assert not {"num_gpu", "mirostat", "typical_p", "options"} & set(body)


def test_top_p_0_keeps_only_the_top_token(client: ollama.Client, fake: FakeVLLM) -> None:
    """Ollama's top_p 0 keeps the most likely token alone; vLLM wants top_p in (0, 1], so that is top_k 1."""
    client.generate(model="smart", prompt="x", options={"top_p": 0, "top_k": 40, "temperature": 0.7, "min_p": 0.1})
    body = fake.last()
    assert body["top_k"] == 1 and "top_p" not in body
    assert (body["temperature"], body["min_p"]) == (0.7, 0.1)  # the other options keep their meaning
    client.generate(model="smart", prompt="x", options={"top_p": 0.5, "top_k": 40})
    assert (fake.last()["top_p"], fake.last()["top_k"]) == (0.5, 40)


def test_non_streamed_durations_invent_no_prompt_eval_time(router: RouterThread, client: ollama.Client,
                                                            fake: FakeVLLM) -> None:
    """A non-streamed answer does not say when its first token came: Ollama's Go omits a zero
    duration, so prompt_eval_duration is left out rather than made up; vLLM's own timings
    (--enable-per-request-metrics) are used when it sends them."""
    for path, body in (("/api/generate", {"model": "smart", "prompt": "x", "stream": False}),
                       ("/api/chat", {"model": "smart", "stream": False,
                                      "messages": [{"role": "user", "content": "x"}]})):
        fake.push(slow(3, 0.05))
        out = post(router, path, body).json()
        assert out["eval_count"] == 3 and out["prompt_eval_count"] > 0
        assert "prompt_eval_duration" not in out, out
        assert out["eval_duration"] >= 150_000_000  # the whole generation: when decoding began is unknown
        assert out["total_duration"] >= out["eval_duration"]
    r = client.generate(model="smart", prompt="x")
    assert r.prompt_eval_duration is None and r.eval_duration
    fake.push(Script(tokens=["a"], finish_reason="stop",
                     metrics={"time_to_first_token_ms": 12.5, "generation_time_ms": 3.0}))
    r = client.chat(model="smart", messages=[{"role": "user", "content": "x"}])
    assert (r.prompt_eval_duration, r.eval_duration) == (12_500_000, 3_000_000)


def test_empty_keep_alive_is_a_400_as_in_ollama(router: RouterThread) -> None:
    """Ollama parses a string keep_alive with Go's time.ParseDuration, which refuses "": never an unload."""
    for body in ({"model": "smart", "prompt": "x", "keep_alive": ""}, {"model": "smart", "keep_alive": ""},
                 {"model": "smart", "messages": [], "keep_alive": " "}):
        r = post(router, "/api/chat" if "messages" in body else "/api/generate", body)
        value = body["keep_alive"]
        assert (r.status_code, r.json()) == (400, {"error": f'time: invalid duration "{value}"'})
    r = post(router, "/api/generate", {"model": "smart", "keep_alive": "0"})
    assert r.json()["done_reason"] == "unload"


def test_null_means_not_set(router: RouterThread, fake: FakeVLLM) -> None:
    """Go's decoder leaves a field as it is on JSON null: null is the same as leaving the field out."""
    fake.reset()
    nulls = dict.fromkeys(("suffix", "system", "template", "context", "stream", "raw", "format", "images",
                           "options", "keep_alive", "think", "logprobs", "top_logprobs"))
    r = post(router, "/api/generate", {"model": "smart", "prompt": "x", **nulls})
    assert r.status_code == 200 and ndjson(r)[-1]["done"], r.text
    assert post(router, "/api/generate", {"model": "smart", "prompt": None}).json()["done_reason"] == "load"
    r = post(router, "/api/generate", {"model": None, "prompt": "x"})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    messages = [{"role": "user", "content": "Weather?", "images": None, "thinking": None},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": None, "function": {"name": "get_weather", "arguments": None, "index": None}}]},
                {"role": "tool", "content": "sunny", "tool_name": None, "tool_call_id": None}]
    tool = {"type": None, "function": {**WEATHER["function"], "description": None}}
    r = post(router, "/api/chat", {"model": "smart", "messages": messages, "tools": [tool], "stream": False,
                                   "options": {"temperature": None, "stop": None}})
    assert r.status_code == 200, r.text
    sent = fake.last()
    assert sent["tools"][0]["type"] == "function"
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert "temperature" not in sent
    r = post(router, "/api/embeddings", {"model": "embedder", "prompt": None})
    assert (r.status_code, r.json()) == (200, {"embedding": []})
    assert post(router, "/api/embed", {"model": "embedder", "input": None, "truncate": None}).status_code == 200
    assert post(router, "/api/show", {"model": None, "name": "smart", "verbose": None}).status_code == 200


def test_format_reaches_vllm_as_structured_output(client: ollama.Client, fake: FakeVLLM) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    client.chat(model="smart", messages=[{"role": "user", "content": "x"}], format=schema)
    assert fake.last()["response_format"]["json_schema"]["schema"] == schema
    client.generate(model="smart", prompt="x", format="json")
    assert fake.last()["response_format"] == {"type": "json_object"}


# --- chat ---------------------------------------------------------------------------------------


def test_chat_streams_with_thinking(client: ollama.Client, fake: FakeVLLM) -> None:
    """The tiny model cannot reason: the fake answers as vLLM's reasoning parser does."""
    fake.push(thinking(["Let me ", "think."], ["Yes", "."]))
    chunks = list(client.chat(model="smart", messages=[{"role": "user", "content": "ok?"}], stream=True,
                              think=True))
    assert "".join(c.message.thinking or "" for c in chunks) == "Let me think."
    assert "".join(c.message.content or "" for c in chunks) == "Yes."
    assert chunks[-1].done and chunks[-1].eval_count == 4
    assert fake.last()["chat_template_kwargs"]["enable_thinking"] is True
    fake.push(thinking(["a"], ["b"]))
    whole = client.chat(model="smart", messages=[{"role": "user", "content": "ok?"}])
    assert (whole.message.thinking, whole.message.content) == ("a", "b")


def test_a_final_assistant_message_is_continued(client: ollama.Client, fake: FakeVLLM) -> None:
    """Ollama continues a conversation's last assistant message (a prefill) rather than starting a
    new turn, and answers with the continuation alone."""
    messages = [{"role": "user", "content": "Say hello world"}, {"role": "assistant", "content": "Hello"}]
    fake.push(text(" world", "!"))
    chunks = list(client.chat(model="smart", messages=messages, stream=True))
    assert "".join(c.message.content or "" for c in chunks) == " world!"
    body = fake.last()
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"} and not body.get("echo")
    fake.push(text(" world", "!"))
    assert client.chat(model="plain", messages=messages).message.content == " world!"
    assert fake.last()["continue_final_message"] is True
    # A new turn otherwise: after a user's message, or an assistant's empty one (a tool call).
    client.chat(model="smart", messages=[{"role": "user", "content": "x"}])
    assert not {"continue_final_message", "add_generation_prompt"} & set(fake.last())
    client.chat(model="smart", messages=[*messages[:1], {"role": "assistant", "content": ""}])
    assert not {"continue_final_message", "add_generation_prompt"} & set(fake.last())


@pytest.fixture
def limited(client: ollama.Client, fake: FakeVLLM) -> Iterator[FakeVLLM]:
    """The fake enforcing a 512-token context, as "plain" is served with."""
    fake.max_model_len = 512
    yield fake
    fake.max_model_len = None


def long_chat(turns: int, words: int, last: int = 20, system: int = 10) -> list[dict[str, Any]]:
    """A conversation of `turns` user/assistant exchanges of `words` words each (the fake counts
    one token per word, plus one for the whole prompt), then a user message of `last` words."""
    def say(tag: str, n: int) -> str:
        return " ".join([tag] + ["w"] * (n - 1))

    messages = [{"role": "system", "content": say("sys", system)}]
    for i in range(turns):
        messages += [{"role": "user", "content": say(f"u{i}", words)},
                     {"role": "assistant", "content": say(f"a{i}", words)}]
    return [*messages, {"role": "user", "content": say("last", last)}]


def tags(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"].split()[0] if isinstance(m["content"], str) else m["content"][0]["text"].split()[0]
            for m in messages]


def sent(fake: FakeVLLM, path: str) -> list[dict[str, Any]]:
    return [body for p, body in fake.requests if p == path]


@pytest.mark.parametrize("stream", [True, False])
def test_a_chat_too_long_for_the_context_loses_its_oldest_messages(client: ollama.Client, limited: FakeVLLM,
                                                                   stream: bool) -> None:
    """As Ollama's chatPrompt: the oldest messages go (whole turns; their images with them), system
    messages and the last message stay. Only a refused request pays: here vLLM refuses, the router
    counts a few cuts with /tokenize and sends the shortest loss that fits, once."""
    fake = limited
    messages = long_chat(turns=10, words=60)  # 10 + 1200 + 20 words: far more than 512
    messages[1]["images"] = [PNG]
    answer = client.chat(model="plain", messages=messages, stream=stream)
    if stream:
        answer = list(answer)[-1]
    assert answer.done and answer.done_reason == "stop"
    chats, counts = sent(fake, "/v1/chat/completions"), sent(fake, "/tokenize")
    assert len(chats) == 2 and tags(chats[0]["messages"]) == tags(messages)  # refused, then the retry
    # room for the answer: a quarter of the 512-token context (no num_predict) → prompt <= 384:
    # 1 + 10 + 20 + 2 * 60 * 2 = 271 with two turns kept; a third would make 391
    assert tags(chats[1]["messages"]) == ["sys", "u8", "a8", "u9", "a9", "last"]
    assert answer.prompt_eval_count == 271
    assert not any(isinstance(m["content"], list) for m in chats[1]["messages"])  # the image went with u0
    assert 1 <= len(counts) <= 1 + 4  # the deepest cut, then bisection over 10 cuts
    assert tags(counts[0]["messages"]) == ["sys", "last"]
    assert all(body["model"] == "plain:latest" for body in counts)
    # num_predict is the answer's room when the client sets it
    fake.requests.clear()
    answer = client.chat(model="plain", messages=messages, stream=stream, options={"num_predict": 300})
    if stream:
        answer = list(answer)[-1]
    assert answer.eval_count == 300 and answer.prompt_eval_count <= 512 - 300
    assert tags(sent(fake, "/v1/chat/completions")[-1]["messages"]) == ["sys", "u9", "a9", "last"]


def test_a_chat_that_cannot_fit_is_ollamas_400(client: ollama.Client, router: RouterThread,
                                                limited: FakeVLLM) -> None:
    """Even the system messages and the last message are too long: Ollama's words, 400, before any
    output (streamed or not). ``truncate: false`` asks for that rather than losing messages."""
    fake = limited
    too_long = long_chat(turns=2, words=20, last=600)
    for stream in (True, False):
        fake.requests.clear()
        r = post(router, "/api/chat", {"model": "plain", "messages": too_long, "stream": stream})
        assert (r.status_code, r.json()) == (400, {"error": "the input length exceeds the context length"})
        assert len(sent(fake, "/tokenize")) == 1 and len(sent(fake, "/v1/chat/completions")) == 1
    fake.requests.clear()
    r = post(router, "/api/chat", {"model": "plain", "messages": too_long[-1:]})  # nothing to drop: no count
    assert (r.status_code, r.json()) == (400, {"error": "the input length exceeds the context length"})
    assert [p for p, _ in fake.requests] == ["/v1/chat/completions"]
    fake.requests.clear()
    r = post(router, "/api/chat", {"model": "plain", "messages": long_chat(10, 60), "truncate": False})
    assert (r.status_code, r.json()) == (400, {"error": "the input length exceeds the context length"})
    assert [p for p, _ in fake.requests] == ["/v1/chat/completions"]
    # a prompt exactly as long as the context leaves no room for a token: vLLM refuses it too
    fake.requests.clear()
    exact = long_chat(turns=2, words=100, last=101)
    assert sum(len(m["content"].split()) for m in exact) + 1 == 512
    assert client.chat(model="plain", messages=exact).done
    assert len(sent(fake, "/v1/chat/completions")) == 2


def test_when_counting_fails_vllms_refusal_is_the_answer(client: ollama.Client, limited: FakeVLLM) -> None:
    fake = limited
    fake.push(error(500, "tokenizer broke"))  # the fake refuses the chat without using a script
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="plain", messages=long_chat(10, 60))
    assert e.value.status_code == 400
    assert e.value.error.startswith("This model's maximum context length is 512 tokens. However, your prompt "
                                    "contains 1231 input tokens")
    assert [p for p, _ in fake.requests] == ["/v1/chat/completions", "/tokenize"]


def test_other_refusals_and_generate_are_not_truncated(client: ollama.Client, router: RouterThread,
                                                       limited: FakeVLLM) -> None:
    """Only a refusal for the context's length starts a count; /api/generate has no messages to drop
    (Ollama's generate drops none the client sent either): refused in the words /api/chat uses, with
    vLLM's detail after them."""
    fake = limited
    fake.push(error(400, "Conversation roles must alternate user/assistant/user/assistant/..."))
    with pytest.raises(ollama.ResponseError, match="roles must alternate"):
        client.chat(model="plain", messages=long_chat(2, 5))
    assert [p for p, _ in fake.requests] == ["/v1/chat/completions"]
    fake.requests.clear()
    r = post(router, "/api/generate", {"model": "plain", "prompt": " ".join(["w"] * 600), "stream": False})
    assert r.status_code == 400
    assert r.json()["error"].startswith("the input length exceeds the context length: This model's maximum "
                                        "context length is 512")
    assert [p for p, _ in fake.requests] == ["/v1/chat/completions"]
    # the normal path: no count, one call
    fake.requests.clear()
    assert client.chat(model="plain", messages=long_chat(2, 20)).done
    assert [p for p, _ in fake.requests] == ["/v1/chat/completions"]


def test_chat_tool_call_round_trip(client: ollama.Client, fake: FakeVLLM) -> None:
    """The tiny model never calls tools: the fake streams a call as vLLM's hermes parser does."""
    fake.push(tool_calls({"name": "get_weather", "arguments": '{"city": "Tokyo"}', "id": "chatcmpl-tool-abc"}))
    messages: list[Any] = [{"role": "user", "content": "Weather in Tokyo?"}]
    chunks = list(client.chat(model="smart", messages=messages, tools=[WEATHER], stream=True))
    calls = [tc for c in chunks for tc in c.message.tool_calls or ()]
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == {"city": "Tokyo"}
    assert fake.last()["tools"] == [WEATHER]
    # The client runs the tool and sends the result back, named by tool (the python client drops ids).
    messages += [{"role": "assistant", "content": "", "tool_calls": calls},
                 {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    fake.push(text("It", " is", " sunny"))
    answer = client.chat(model="smart", messages=messages, tools=[WEATHER])
    assert answer.message.content == "It is sunny"
    sent = fake.last()["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": sent[1]["tool_calls"][0]["id"],
                       "name": "get_weather"}


def test_chat_logprobs(client: ollama.Client, fake: FakeVLLM) -> None:
    fake.push(Script(tokens=["a", "b"], finish_reason="stop", logprobs=True))
    r = client.chat(model="smart", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2)
    assert [lp.token for lp in r.logprobs] == ["a", "b"]
    assert r.logprobs[0].top_logprobs[1].token == "x"
    assert fake.last()["top_logprobs"] == 3  # one more than asked, kept to 2: see translate._logprobs


def test_alias_resolves_and_the_reply_names_the_model_as_asked(client: ollama.Client, fake: FakeVLLM) -> None:
    r = client.chat(model="clever", messages=[{"role": "user", "content": "x"}])
    assert r.model == "clever"
    assert fake.last()["model"] == "smart:latest"


# --- embeddings ----------------------------------------------------------------------------------


def test_embed(client: ollama.Client, fake: FakeVLLM) -> None:
    r = client.embed(model="embedder", input=["a", "bb"])
    assert len(r.embeddings) == 2
    assert all(abs(sum(x * x for x in v) - 1) < 1e-9 for v in r.embeddings)
    assert r.prompt_eval_count == 4
    assert len(client.embed(model="embedder", input="a", dimensions=2).embeddings[0]) == 2
    assert client.embed(model="embedder", input=[]).embeddings == []
    assert fake.last()["input"] == ["a"]  # the empty request never reached vLLM
    legacy = client.embeddings(model="embedder", prompt="a")
    assert legacy.embedding == [2.0, 2.0, 2.0, 1.0]  # as vLLM gave it: not normalised


def test_embed_too_long_without_truncation_is_ollamas_400(client: ollama.Client, fake: FakeVLLM) -> None:
    fake.push(error(400, "This model's maximum context length is 512 tokens. However, your prompt contains 600 "
                         "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
                         "length of the input prompt. (parameter=input_tokens, value=600)"))
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="embedder", input="long " * 600, truncate=False)
    assert e.value.status_code == 400
    assert e.value.error.startswith("the input length exceeds the context length: This model's maximum")
    assert "truncate_prompt_tokens" not in fake.last()


def test_embed_on_a_generative_model_is_a_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="plain", input="x")
    assert e.value.status_code == 400 and "does not support embeddings" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="embedder", prompt="x")
    assert e.value.status_code == 400 and "does not support generate" in e.value.error


# --- listing --------------------------------------------------------------------------------------


def test_tags_show_ps_version(client: ollama.Client, router: RouterThread) -> None:
    assert {m.model for m in client.list().models} == {"smart:latest", "plain:latest", "embedder:latest",
                                                       "gone:latest"}
    show = client.show("smart")
    assert show.capabilities == ["completion", "tools", "thinking"]
    assert show.modelinfo == {}  # no files to read (a remote model): nothing invented
    assert "num_ctx" in (show.parameters or "")
    assert client.show("embedder").capabilities == ["embedding"]
    ps = client.ps()
    running = {m.model: m for m in ps.models}
    assert "gone:latest" not in running  # unreachable: not loaded
    assert running["smart:latest"].context_length == 1024
    assert running["smart:latest"].size_vram == 0
    assert running["smart:latest"].expires_at.year > 2200  # kept forever, as Ollama shows it
    assert httpx.get(router.url + "/api/version").json() == {"version": "0.12.0"}
    assert httpx.get(router.url + "/").text == "Ollama is running"
    assert httpx.head(router.url + "/").status_code == 200


def test_show_errors(client: ollama.Client, router: RouterThread) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404 and "not found" in e.value.error
    r = post(router, "/api/show", {})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    assert post(router, "/api/show", {"name": "smart"}).status_code == 200  # the legacy key


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show"])
def test_bad_bodies_are_clean_400s(router: RouterThread, path: str) -> None:
    cases = [
        (b"", "missing request body"),
        (b"{", "invalid JSON: input data was truncated"),
        (b"{'model': 1}", "invalid JSON: "),
        (b"[]", "Expected `object`, got `array`"),
        (b'{"model": 1}', "model: Expected `str | null`, got `int`"),
    ]
    for content, message in cases:
        r = post(router, path, content=content)
        assert r.status_code == 400, (content, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"].startswith(message), (content, r.text)
    if path != "/api/show":
        r = post(router, path, {"prompt": "x", "input": "x", "messages": [{"role": "user", "content": "x"}]})
        assert (r.status_code, r.json()) == (400, {"error": "model is required"})


def test_wrong_types_name_the_field(router: RouterThread) -> None:
    r = post(router, "/api/generate", {"model": "smart", "prompt": "x", "options": {"stop": "w1"}})
    assert (r.status_code, r.json()) == (400, {"error": "options.stop: Expected `array | null`, got `str`"})
    r = post(router, "/api/chat", {"model": "smart", "messages": [{"content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]
    r = post(router, "/api/generate", {"model": "smart", "prompt": "x", "keep_alive": "300"})
    assert r.json() == {"error": 'time: missing unit in duration "300"'}


def test_num_ctx_above_the_served_context_is_clamped_with_one_warning(router: RouterThread, fake: FakeVLLM,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Ollama clamps num_ctx to what the model supports and logs it; the request never fails for it.
    Clients send their num_ctx with every request: one warning per model and value, then debug."""
    fake.reset()
    caplog.set_level("DEBUG", logger="vllama.service")
    for path, body in [("/api/generate", {"model": "smart", "prompt": "x"}),
                       ("/api/chat", {"model": "smart", "messages": [{"role": "user", "content": "x"}]})] * 2:
        r = post(router, path, {**body, "stream": False, "options": {"num_ctx": 999999, "num_predict": 5}})
        assert r.status_code == 200 and r.json()["done"], r.text
        sent = fake.last()
        assert "num_ctx" not in json.dumps(sent) and sent["max_tokens"] == 5  # nothing vLLM would refuse
    notes = [rec for rec in caplog.records if "num_ctx 999999" in rec.getMessage()]
    assert [rec.levelname for rec in notes] == ["WARNING", "DEBUG", "DEBUG", "DEBUG"]
    assert "1024" in notes[0].getMessage() and "max_model_len" in notes[0].getMessage()


def test_not_found_and_not_supported(client: ollama.Client, router: RouterThread) -> None:
    """The 404 is worded per endpoint as Ollama's server words it (the reference's table)."""
    for call, wording in ((lambda: client.generate(model="nope", prompt="x"), "model 'nope' not found"),
                          (lambda: client.generate(model="nope", prompt=""), "model 'nope' not found"),
                          (lambda: client.chat(model="nope", messages=[{"role": "user", "content": "x"}]),
                           "model 'nope' not found"),
                          (lambda: client.embed(model="nope", input="x"),
                           'model "nope" not found, try pulling it first'),
                          (lambda: client.embeddings(model="nope", prompt="x"),
                           'model "nope" not found, try pulling it first'),
                          (lambda: client.show("nope"), "model 'nope:latest' not found")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and e.value.error == wording
    with pytest.raises(ollama.ResponseError, match='"plain" does not support thinking'):
        client.chat(model="plain", messages=[{"role": "user", "content": "x"}], think=True)
    with pytest.raises(ollama.ResponseError, match='"plain" does not support tools'):
        client.chat(model="plain", messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    assert httpx.get(router.url + "/api/nothing").json() == {"error": "404 page not found"}
    assert httpx.get(router.url + "/api/chat").status_code == 405


@pytest.mark.parametrize(("path", "word"), [("/api/copy", "copy"), ("/api/create", "create"), ("/api/push", "push"),
                                            ("/api/blobs/sha256:abc", "blobs")])
def test_model_management_is_refused_with_the_reason(router: RouterThread, path: str, word: str) -> None:
    r = post(router, path, {"model": "x", "source": "a", "destination": "b"})
    assert r.status_code == 501
    assert "models.yaml" in r.json()["error"]


def test_ollama_client_sees_the_refusal(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="does not copy models"):
        client.copy("smart", "smarter")
    with pytest.raises(ollama.ResponseError, match="does not create models"):
        client.create(model="x", from_="smart")


def test_upstream_error_before_output_keeps_its_status(client: ollama.Client, fake: FakeVLLM) -> None:
    fake.push(error(400, "temperature must be non-negative"))
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat(model="smart", messages=[{"role": "user", "content": "x"}], stream=True))
    assert (e.value.status_code, e.value.error) == (400, "temperature must be non-negative")
    fake.push(error(500, "engine dead"))
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="smart", prompt="x")
    assert e.value.status_code == 502


# vLLM 0.32's own refusal of five stop strings, as test_translate reads it.
STOP_DUMP = (Path(__file__).parent / "golden" / "stop_validation_error.txt").read_text()


def test_vllms_validation_dump_is_one_readable_line_on_the_ollama_api(router: RouterThread, client: ollama.Client,
                                                                      fake: FakeVLLM) -> None:
    """A model at a `url` (a vLLM vLLama did not start) may keep vLLM's limit of 4 stop strings."""
    stop = ["a", "b", "c", "d", "e"]
    readable = "stop: List should have at most 4 items after validation, not 5"
    for stream in (False, True):
        fake.push(error(400, STOP_DUMP))
        with pytest.raises(ollama.ResponseError) as e:
            list(client.chat(model="smart", messages=[{"role": "user", "content": "x"}], stream=True,
                             options={"stop": stop})) if stream else \
                client.chat(model="smart", messages=[{"role": "user", "content": "x"}], options={"stop": stop})
        assert (e.value.status_code, e.value.error) == (400, readable)
        assert fake.last()["stop"] == stop  # a url model's limit is unknown: vLLM decides
    fake.push(error(400, STOP_DUMP))
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="smart", prompt="x", raw=True, options={"stop": stop})
    assert (e.value.status_code, e.value.error) == (400, readable)
    fake.push(error(400, STOP_DUMP))  # OpenAI clients get vLLM's own body
    r = post(router, "/v1/chat/completions", {"model": "smart", "messages": [{"role": "user", "content": "x"}],
                                              "stop": stop})
    assert r.status_code == 400 and r.json()["error"]["message"] == STOP_DUMP


def test_the_stop_limit_is_the_one_vllama_starts_vllm_with(tmp_path: Any) -> None:
    """Models vLLama starts accept engine.MAX_STOP_STRINGS stop strings, or what their env says;
    more is refused before vLLM, in one sentence."""
    from types import SimpleNamespace

    from router import config, engine
    from router.service import OllamaService
    cfg = config.parse({"engine": {"env": {"VLLM_MAX_STOP_STRINGS": "8"}}, "models": [
        {"name": "a", "source": "./a", "max_model_len": 512},
        {"name": "b", "source": "./b", "max_model_len": 512, "env": {"VLLM_MAX_STOP_STRINGS": "6"}},
        {"name": "c", "source": "./c", "max_model_len": 512, "url": "http://127.0.0.1:1"}]},
        path=tmp_path / "models.yaml")
    service = OllamaService(SimpleNamespace(config=cfg), upstream=None)  # type: ignore[arg-type]
    assert [service.target(m).max_stop for m in cfg.models] == [8, 6, None]
    default = config.parse({"models": [{"name": "a", "source": "./a"}]}, path=tmp_path / "models.yaml")
    assert engine.vllm_env(default, default.models[0])["VLLM_MAX_STOP_STRINGS"] == str(engine.MAX_STOP_STRINGS)
    assert engine.max_stop_strings(default, default.models[0]) == engine.MAX_STOP_STRINGS >= 32


def test_upstream_failure_after_the_role_chunk_is_still_before_any_output(router: RouterThread,
                                                                         client: ollama.Client,
                                                                         fake: FakeVLLM) -> None:
    """vLLM's first chat chunk carries only the role: a failure right after it comes before any
    output, so it keeps a status as Ollama's does (the client raises with the real code)."""
    fake.push(Script(tokens=["a", "b"], error_after=0))
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat(model="smart", messages=[{"role": "user", "content": "x"}], stream=True))
    assert (e.value.status_code, e.value.error) == (502, "the engine died")
    fake.push(Script(tokens=["a", "b"], error_after=0))
    r = post(router, "/api/generate", {"model": "smart", "prompt": "x"})
    assert (r.status_code, r.json()) == (502, {"error": "the engine died"})
    fake.push(Script(tokens=["a", "b"], cut_after=0))
    r = post(router, "/api/chat", {"model": "smart", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502 and set(r.json()) == {"error"}
    # vLLM aborting the generation: mid-way an error line, before any output an error status.
    fake.push(Script(tokens=["a", "b"], finish_reason="abort", delay=0.05), Script(tokens=[], finish_reason="abort"))
    lines = ndjson(post(router, "/api/chat", {"model": "smart", "messages": [{"role": "user", "content": "x"}]}))
    assert lines[0]["message"]["content"] == "a" and "aborted" in lines[-1]["error"]
    r = post(router, "/api/chat", {"model": "smart", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502 and "aborted" in r.json()["error"]
    # An empty answer is still a stream: the role chunk, the finish, the usage, then done.
    fake.push(text())
    lines = ndjson(post(router, "/api/chat", {"model": "smart", "messages": [{"role": "user", "content": "x"}]}))
    assert len(lines) == 1 and lines[0]["done"] and lines[0]["message"]["content"] == ""
    assert _wait(lambda: router.fleet.runtimes["smart:latest"].inflight == 0)


def test_upstream_failure_mid_stream_ends_with_an_error_line(router: RouterThread, fake: FakeVLLM) -> None:
    fake.reset()
    fake.push(Script(tokens=["a", "b", "c"], error_after=2), Script(tokens=["a", "b", "c"], cut_after=1))
    lines = ndjson(post(router, "/api/chat", {"model": "smart", "messages": [{"role": "user", "content": "x"}]}))
    assert [ln.get("message", {}).get("content") for ln in lines[:2]] == ["a", "b"]
    assert lines[-1] == {"error": "the engine died"}
    r = post(router, "/api/generate", {"model": "smart", "prompt": "x"})
    assert r.status_code == 200
    lines = ndjson(r)
    assert lines[0]["response"] == "a"
    assert "error" in lines[-1] and "closed the connection" in lines[-1]["error"]


def test_ollama_client_raises_on_an_error_line(client: ollama.Client, fake: FakeVLLM) -> None:
    fake.push(Script(tokens=["a", "b"], error_after=1))
    with pytest.raises(ollama.ResponseError, match="the engine died"):
        list(client.generate(model="smart", prompt="x", stream=True))


def test_unreachable_model_is_a_503(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="gone", prompt="x")
    assert e.value.status_code == 503


def test_a_bad_request_is_refused_before_the_model_is_waited_for(router: RouterThread, fake: FakeVLLM) -> None:
    """What the registry knows is checked before the lease: a request the model cannot serve is a
    400 at once, even to a model that is not up ("gone" would be waited for, then a 503), so a
    stopped on-demand model is never cold-started just to refuse the request."""
    fake.reset()
    msg = [{"role": "user", "content": "x"}]
    for path, body, wording in (
            ("/api/chat", {"model": "gone", "messages": msg, "think": True}, '"gone" does not support thinking'),
            ("/api/chat", {"model": "gone", "messages": msg, "tools": [WEATHER]}, '"gone" does not support tools'),
            ("/api/generate", {"model": "gone", "prompt": "x", "suffix": "y"}, '"gone" does not support insert'),
            ("/api/generate", {"model": "gone", "prompt": "x", "images": ["!"]}, "illegal base64 data in image"),
            ("/api/embed", {"model": "gone", "input": "x"}, '"gone" does not support embeddings'),
            ("/api/embeddings", {"model": "gone", "prompt": "x"}, '"gone" does not support embeddings'),
            ("/api/chat", {"model": "embedder", "messages": msg}, '"embedder" does not support chat'),
            ("/api/generate", {"model": "embedder", "prompt": "x", "context": [1]},
             '"embedder" does not support generate')):
        began = time.monotonic()
        r = post(router, path, body)
        assert r.status_code == 400 and r.json()["error"].startswith(wording), (path, r.status_code, r.text)
        assert time.monotonic() - began < 0.5
    assert fake.requests == []  # not even the /tokenize of a continuation


def test_head_has_the_gets_headers(router: RouterThread) -> None:
    """As Go's net/http answers HEAD: the GET's Content-Type and Content-Length, no body."""
    for path in ("/", "/api/version", "/api/tags"):
        got = httpx.get(router.url + path)
        headed = httpx.head(router.url + path)
        assert headed.status_code == 200 and headed.content == b""
        assert headed.headers["content-length"] == str(len(got.content)) == got.headers["content-length"], path
        assert headed.headers["content-type"] == got.headers["content-type"], path


def test_model_names_resolve_as_ollama_compares_them(client: ollama.Client, router: RouterThread,
                                                     fake: FakeVLLM) -> None:
    """Case-insensitive, with the default host, namespace and tag: all of these are smart:latest,
    and the answers carry the registry's name."""
    for name in ("SMART", "Smart:Latest", "library/smart", "registry.ollama.ai/library/smart:latest"):
        r = client.chat(model=name, messages=[{"role": "user", "content": "x"}], options={"num_predict": 1})
        assert r.model == "smart:latest" and fake.last()["model"] == "smart:latest", name
        assert client.generate(model=name, prompt="x", options={"num_predict": 1}).model == "smart:latest"
        assert client.show(name).capabilities is not None
    assert client.embed(model="EMBEDDER", input="a").model == "embedder:latest"
    assert client.chat(model="smart", messages=[{"role": "user", "content": "x"}]).model == "smart"  # as sent
    r = post(router, "/v1/chat/completions", {"model": "Library/Smart", "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 1})
    assert r.status_code == 200 and fake.last()["model"] == "smart:latest"


# --- cancellation -------------------------------------------------------------------------------------


def _wait(cond: Any, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_client_disconnect_mid_stream_cancels_the_upstream_request(router: RouterThread, fake: FakeVLLM) -> None:
    fake.reset()
    fake.push(slow(500, 0.02))
    with httpx.stream("POST", router.url + "/api/generate", json={"model": "smart", "prompt": "x"}) as r:
        for got, _ in enumerate(r.iter_lines(), 1):
            if got == 3:
                break
    assert _wait(lambda: fake.disconnects == 1 and fake.running == 0), (fake.disconnects, fake.running)
    assert _wait(lambda: router.fleet.runtimes["smart:latest"].inflight == 0)


def test_client_disconnect_during_a_non_streamed_request_cancels_it(router: RouterThread, fake: FakeVLLM) -> None:
    fake.reset()
    fake.push(slow(200, 0.02))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/api/chat", json={"model": "smart", "stream": False,
                                                   "messages": [{"role": "user", "content": "x"}]}, timeout=0.3)
    assert _wait(lambda: fake.disconnects == 1 and fake.running == 0), (fake.disconnects, fake.running)
    assert _wait(lambda: router.fleet.runtimes["smart:latest"].inflight == 0)


def test_streaming_is_not_buffered(router: RouterThread, fake: FakeVLLM) -> None:
    fake.reset()
    fake.push(slow(4, 0.3))
    times = []
    with httpx.stream("POST", router.url + "/api/generate", json={"model": "smart", "prompt": "x"}) as r:
        for _line in r.iter_lines():
            times.append(time.monotonic())
    assert len(times) == 5
    assert times[3] - times[0] > 0.6  # each token arrived when vLLM sent it


# --- pass-through ---------------------------------------------------------------------------------------


def test_openai_client_through_the_pass_through(router: RouterThread, fake: FakeVLLM) -> None:
    import openai

    fake.reset()
    oa = openai.OpenAI(base_url=router.url + "/v1", api_key="none")
    r = oa.chat.completions.create(model="clever", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices[0].message.content == "w0 w1 " and r.model == "smart:latest"
    assert fake.last()["model"] == "smart:latest"  # the alias was rewritten to the served name
    stream = oa.chat.completions.create(model="smart:latest", messages=[{"role": "user", "content": "x"}],
                                        max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "w0 w1 w2 "
    assert oa.completions.create(model="plain", prompt="x", max_tokens=1).choices[0].text == "w0 "
    emb = oa.embeddings.create(model="embedder", input=["a"])
    assert emb.data[0].embedding == [2.0, 2.0, 2.0, 1.0]
    assert {m.id for m in oa.models.list().data} == {"smart:latest", "plain:latest", "embedder:latest",
                                                      "gone:latest"}
    assert oa.models.retrieve("clever").id == "smart:latest"
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    fake.push(error(400, "bad request from vLLM"))
    with pytest.raises(openai.BadRequestError, match="bad request from vLLM"):
        oa.chat.completions.create(model="smart", messages=[{"role": "user", "content": "x"}])


def test_pass_through_errors_are_openai_shaped(router: RouterThread) -> None:
    r = post(router, "/v1/chat/completions", content=b"")
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing request body"
    r = post(router, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is required"
    r = post(router, "/v1/chat/completions", {"model": "nope", "messages": []})
    assert r.status_code == 404 and r.json()["error"] == {"message": "The model `nope` does not exist.",
                                                          "type": "NotFoundError", "param": "model", "code": 404}
    r = post(router, "/v1/messages", {"model": "nope", "messages": [], "max_tokens": 1})
    assert r.status_code == 404 and r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"


def test_pass_through_refuses_an_api_the_model_lacks(router: RouterThread, fake: FakeVLLM) -> None:
    """Embeddings from a model that generates, or a generation from an embedding model: an
    OpenAI-shaped 400 from the registry (not vLLM's bare 404), before the model is waited for."""
    import openai

    fake.reset()
    oa = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match='"smart" does not support embeddings'):
        oa.embeddings.create(model="smart", input=["a"])
    with pytest.raises(openai.BadRequestError, match='"embedder" does not support chat'):
        oa.chat.completions.create(model="embedder", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match='"embedder" does not support generate'):
        oa.completions.create(model="embedder", prompt="x")
    began = time.monotonic()
    r = post(router, "/v1/embeddings", {"model": "gone", "input": "x"})  # not up: no wait, no 503
    assert r.status_code == 400 and time.monotonic() - began < 0.5
    assert r.json()["error"]["type"] == "BadRequestError" and "does not support embeddings" in r.text
    r = post(router, "/v1/messages", {"model": "embedder", "messages": [], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert fake.requests == []


def test_anthropic_client_through_the_pass_through(router: RouterThread, fake: FakeVLLM) -> None:
    import anthropic

    fake.reset()
    client = anthropic.Anthropic(base_url=router.url, api_key="none")
    msg = client.messages.create(model="clever", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "w0 w1"
    assert fake.last("/v1/messages")["model"] == "smart:latest"


def test_pass_through_disconnect_cancels_upstream(router: RouterThread, fake: FakeVLLM) -> None:
    fake.reset()
    fake.push(slow(500, 0.02))
    with httpx.stream("POST", router.url + "/v1/chat/completions",
                      json={"model": "smart", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n == 4:
                break
    assert _wait(lambda: fake.disconnects == 1 and fake.running == 0), (fake.disconnects, fake.running)
    assert _wait(lambda: router.fleet.runtimes["smart:latest"].inflight == 0)
