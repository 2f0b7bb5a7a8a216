"""Every Ollama ⇄ OpenAI translation rule, both directions, with golden pairs.

Requests: an Ollama request (as a client sends it) → the exact vLLM body.
Responses: vLLM's own output, captured from vLLM 0.32 serving the tiny test
model (tests/golden/*.sse|json: streams and bodies, logprobs, token ids, and a
tool call forced with structured output under the hermes parser) → the exact
Ollama lines. Reasoning ("thinking") cannot be captured with the tiny model,
so those chunks are built in vLLM's documented shape (``delta.reasoning``).
Every response is also parsed by the official ollama client's own models.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import msgspec
import ollama
import pytest

from router import translate as t
from router import wire
from router.translate import Target, Timing, TranslationError

GOLDEN = Path(__file__).parent / "golden"
M = Target(name="m:latest", max_model_len=1024, label="m")
THINKER = Target(name="q:latest", max_model_len=4096, thinking=True, tools=True, label="q")
EMBEDDER = Target(name="e:latest", embedding=True, label="e")
VOLATILE = {"created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration"}


def gen(**kw: Any) -> wire.GenerateRequest:
    return msgspec.convert({"model": "m", **kw}, wire.GenerateRequest)


def chat(**kw: Any) -> wire.ChatRequest:
    return msgspec.convert({"model": "m", **kw}, wire.ChatRequest)


def opts(**kw: Any) -> dict[str, Any]:
    return t.sampling(msgspec.convert(kw, wire.Options), M)


def sse(name: str) -> list[dict[str, Any]]:
    events = []
    for block in (GOLDEN / name).read_text().split("\n\n"):
        line = block.strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def golden(name: str) -> dict[str, Any]:
    return json.loads((GOLDEN / name).read_text())


def lines(state: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run vLLM events through a stream state as the service does; volatile fields dropped."""
    out = []
    for n, ev in enumerate(events):
        c = state.chunk(ev, 1000 + n)
        if c is not None:
            out.append(c)
    out.append(state.done(5000))
    return [strip(msgspec.to_builtins(c)) for c in out]


def strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in VOLATILE}


# --- requests: generate ---------------------------------------------------------------


def test_generate_goes_through_the_chat_template_as_system_and_user_messages() -> None:
    call = t.generate_request(gen(prompt="Why is the sky blue?", system="Be brief.", stream=False,
                                  options={"temperature": 0, "num_predict": 12}), M)
    assert call.path == "/v1/chat/completions"
    assert call.body == {
        "model": "m:latest",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
        "return_token_ids": True, "temperature": 0.0, "max_tokens": 12, "stream": False,
    }


def test_generate_streams_by_default_and_asks_for_usage() -> None:
    call = t.generate_request(gen(prompt="hi"), M)
    assert call.body["stream"] is True
    assert call.body["stream_options"] == {"include_usage": True}


def test_raw_generate_goes_to_completions_as_is() -> None:
    call = t.generate_request(gen(prompt="<s>[INST] hi [/INST]", raw=True, stream=False), M)
    assert call.path == "/v1/completions"
    assert call.body == {"model": "m:latest", "prompt": "<s>[INST] hi [/INST]", "stream": False}


def test_raw_refuses_template_system_and_context() -> None:
    for extra in ({"system": "s"}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        with pytest.raises(TranslationError, match="raw mode does not support template, system, or context"):
            t.generate_request(gen(prompt="x", raw=True, **extra), M)


def test_the_completions_paths_refuse_what_they_cannot_carry() -> None:
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    for extra in ({"raw": True}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        with pytest.raises(TranslationError, match="images cannot be sent with raw, template or context"):
            t.generate_request(gen(prompt="x", images=[png], **extra), M)
        with pytest.raises(TranslationError, match="does not support thinking"):
            t.generate_request(gen(prompt="x", think=True, **extra), M)
    assert t.generate_request(gen(prompt="x", images=[png]), M).path == "/v1/chat/completions"


def test_request_template_is_rendered_and_sent_to_completions() -> None:
    call = t.generate_request(gen(prompt="hi", system="sys", stream=False,
                                  template="{{ if .System }}S:{{ .System }}\n{{ end }}U:{{ .Prompt }}\nA:{{ .Response }}"),
                              M)
    assert call.path == "/v1/completions"
    assert call.body["prompt"] == "S:sys\nU:hi\nA:"
    assert call.body["return_token_ids"] is True  # templated: the answer carries `context`


def test_template_features_beyond_the_subset_are_refused() -> None:
    with pytest.raises(TranslationError, match="Go template features"):
        t.render_template("{{ range .Messages }}{{ .Content }}{{ end }}", None, "x")
    assert t.render_template("{{- if .System }}<<{{ .System }}>>{{ end }}{{ .Prompt }}", None, "p") == "p"


def test_context_continuation_is_a_token_prompt() -> None:
    tok = t.tokenize_request(gen(prompt="and then?", system="s", context=[1, 5, 6]), M)
    assert tok.path == "/tokenize"
    assert tok.body == {"model": "m:latest", "add_generation_prompt": True,
                        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "and then?"}]}
    ids = t.context_prompt([1, 5, 6], [1, 9, 10])  # the new turn's BOS is not repeated
    assert ids == [1, 5, 6, 9, 10]
    call = t.generate_request(gen(prompt="and then?", context=[1, 5, 6], stream=False), M, ids)
    assert call.path == "/v1/completions"
    assert call.body["prompt"] == [1, 5, 6, 9, 10]
    assert call.body["return_token_ids"] is True


def test_suffix_is_refused_as_ollama_does_for_models_without_insert() -> None:
    with pytest.raises(TranslationError, match='"m" does not support insert'):
        t.generate_request(gen(prompt="def f(", suffix="return 1"), M)


def test_images_become_data_urls_and_bad_base64_is_a_400() -> None:
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    call = t.generate_request(gen(prompt="what is this?", images=[png]), M)
    assert call.body["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    with pytest.raises(TranslationError, match="illegal base64 data"):
        t.generate_request(gen(prompt="x", images=["not base64!"]), M)


def test_embedding_models_do_not_generate_or_chat() -> None:
    with pytest.raises(TranslationError, match='"e" does not support generate'):
        t.generate_request(gen(prompt="x"), EMBEDDER)
    with pytest.raises(TranslationError, match='"e" does not support chat'):
        t.chat_request(chat(messages=[{"role": "user", "content": "x"}]), EMBEDDER)



def test_pass_through_routes_are_checked_against_the_model() -> None:
    """What /v1 refuses from the registry before relaying (vLLM would answer a bare 404)."""
    with pytest.raises(TranslationError, match='"m" does not support embeddings'):
        t.check_route("/v1/embeddings", M)
    for path, what in (("/v1/chat/completions", "chat"), ("/v1/completions", "generate"), ("/v1/messages", "chat")):
        with pytest.raises(TranslationError, match=f'"e" does not support {what}'):
            t.check_route(path, EMBEDDER)
        t.check_route(path, M)
    t.check_route("/v1/embeddings", EMBEDDER)
    t.check_route("/v1/messages/count_tokens", EMBEDDER)


def test_a_continuation_is_built_before_its_prompt_is_known() -> None:
    """The call for ``context`` is checked and built first; the token ids come after the wait."""
    call = t.generate_request(gen(prompt="x", context=[1, 2]), M, [])
    assert call.path == "/v1/completions" and call.body["prompt"] == []
    full = t.with_prompt(call, [1, 2, 3])
    assert full.body == {**call.body, "prompt": [1, 2, 3]} and call.body["prompt"] == []


def test_an_overlong_prompt_is_refused_in_ollamas_words() -> None:
    assert t.overflow_message("This model's maximum context length is 2048 tokens.") == (
        "the input length exceeds the context length: This model's maximum context length is 2048 tokens.")
    assert t.overflow_message("") == t.CONTEXT_OVERFLOW


# --- requests: options ------------------------------------------------------------------


def test_every_sampling_option_maps_to_vllm() -> None:
    assert opts(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=42, stop=["\n", "User:"], num_predict=100,
                repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 42, "stop": ["\n", "User:"],
        "max_tokens": 100, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
    }


@pytest.mark.parametrize(("num_predict", "expected"), [(7, {"max_tokens": 7}), (-1, {}), (-2, {}), (0, {}),
                                                       (-3, {}), (-1000, {}),
                                                       (5000, {"max_tokens": 1024}), (3.9, {"max_tokens": 3})])
def test_num_predict(num_predict: float, expected: dict[str, Any]) -> None:
    # -1 no limit, -2 fill the context: both are vLLM's default (the rest of the context); Ollama's
    # runner takes any other n <= 0 as no limit too. Above the served context, vLLM would refuse;
    # Ollama stops at the context's end.
    assert opts(num_predict=num_predict) == expected


def test_ollama_sentinels_mean_the_vllm_default() -> None:
    assert opts(seed=-1) == {}  # random
    assert opts(top_k=0) == {"top_k": 0}  # all tokens, as vLLM spells it
    assert opts(top_p=0) == {"top_k": 1}  # Ollama keeps the top token alone; vLLM refuses top_p 0
    assert opts(top_p=0, top_k=0, temperature=0.5) == {"top_k": 1, "temperature": 0.5}
    assert opts(repeat_penalty=0) == {}


def test_options_vllm_cannot_honour_are_accepted_and_ignored() -> None:
    ignored = {"num_gpu": 99, "main_gpu": 0, "num_thread": 8, "num_batch": 512, "num_keep": 4, "use_mmap": True,
               "mirostat": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "typical_p": 0.9, "tfs_z": 1.0,
               "repeat_last_n": 64, "penalize_newline": True, "low_vram": False, "numa": False, "f16_kv": True,
               "some_future_option": "x"}
    assert opts(**ignored) == {}
    assert set(ignored) - {"some_future_option"} <= t.IGNORED_OPTIONS | {"use_mmap"}


def test_num_ctx_above_the_served_context_is_clamped_not_refused() -> None:
    """Ollama clamps num_ctx to what the model supports; vLLM's context is fixed when serving,
    so nothing of num_ctx reaches vLLM whatever its value."""
    for n in (512, 1024, 8192, 10**9):
        assert opts(num_ctx=n) == {}
        assert t.chat_request(chat(messages=[{"role": "user", "content": "x"}], options={"num_ctx": n}), M).body \
            == t.chat_request(chat(messages=[{"role": "user", "content": "x"}]), M).body

    def size(n: int) -> int | None:
        return t.oversized_num_ctx(msgspec.convert({"num_ctx": n}, wire.Options), M)

    assert (size(512), size(1024), size(1025), size(10**9)) == (None, None, 1025, 10**9)
    assert t.oversized_num_ctx(None, M) is None
    assert t.oversized_num_ctx(msgspec.convert({"num_ctx": 10**9}, wire.Options), EMBEDDER) is None  # unknown
    with pytest.raises(TranslationError, match='option "num_ctx" is out of range'):
        opts(num_ctx=1e30)  # not an int Ollama's decoder reads: still refused


@pytest.mark.parametrize(("options", "expected"), [
    ({"temperature": -1}, {"temperature": 0.0}),  # Ollama: below 0 is greedy
    ({"temperature": 5}, {"temperature": 2.0}),  # vLLM's hottest
    ({"top_p": 5}, {"top_p": 1.0}),  # Ollama: >= 1 is off (sent, so generation_config's does not apply)
    ({"top_p": -0.5}, {"top_k": 1}),  # Ollama clamps to 0: the top token alone
    ({"top_k": -5}, {"top_k": 0}),  # Ollama: <= 0 is off
    ({"min_p": 2}, {"min_p": 1.0}), ({"min_p": -1}, {"min_p": 0.0}),
    ({"repeat_penalty": -1}, {}),  # Ollama's sampler: <= 0 is off
    ({"presence_penalty": 3, "frequency_penalty": -7}, {"presence_penalty": 2.0, "frequency_penalty": -2.0}),
    ({"stop": [""]}, {}), ({"stop": ["", "x", ""]}, {"stop": ["x"]}),  # vLLM refuses an empty stop string
])
def test_values_ollama_accepts_but_vllm_refuses_are_mapped_as_ollama_runs_them(
        options: dict[str, Any], expected: dict[str, Any]) -> None:
    assert opts(**options) == expected


def test_stop_strings_up_to_the_models_limit_and_one_sentence_beyond_it() -> None:
    five = [f"s{i}" for i in range(5)]
    assert opts(stop=five) == {"stop": five}  # Ollama has no limit; unknown limit: vLLM decides
    limited = Target(name="m:latest", label="m", max_stop=5)
    assert t.sampling(msgspec.convert({"stop": [*five, ""]}, wire.Options), limited) == {"stop": five}
    with pytest.raises(TranslationError) as e:
        t.chat_request(chat(messages=[{"role": "user", "content": "x"}], options={"stop": [*five, "s5"]}), limited)
    assert str(e.value) == 'option "stop" has 6 strings; "m" accepts at most 5 (VLLM_MAX_STOP_STRINGS in its env)'


def test_wrong_option_types_fail_decoding() -> None:
    with pytest.raises(msgspec.ValidationError, match="Expected `array | null`, got `str`"):
        msgspec.convert({"stop": "x"}, wire.Options)  # Ollama: stop must be an array


# --- requests: format, think, logprobs -------------------------------------------------------


def test_format_json_and_schema() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert t.generate_request(gen(prompt="x", format="json"), M).body["response_format"] == {"type": "json_object"}
    assert t.chat_request(chat(messages=[{"role": "user", "content": "x"}], format=schema), M).body[
        "response_format"] == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema,
                                                                     "strict": True}}
    assert "response_format" not in t.generate_request(gen(prompt="x", format=""), M).body
    with pytest.raises(TranslationError, match="invalid format"):
        t.generate_request(gen(prompt="x", format="yaml"), M)


def test_think() -> None:
    def body(think: Any, target: Target = THINKER) -> dict[str, Any]:
        b = t.chat_request(chat(messages=[{"role": "user", "content": "x"}], think=think), target).body
        return {k: b[k] for k in ("chat_template_kwargs", "reasoning_effort", "include_reasoning") if k in b}

    assert body(None) == {"chat_template_kwargs": {"enable_thinking": True, "thinking": True}}  # on, as Ollama
    assert body(None, M) == {}
    assert body(True) == {"chat_template_kwargs": {"enable_thinking": True, "thinking": True}}
    assert body("high") == {"chat_template_kwargs": {"enable_thinking": True, "thinking": True},
                            "reasoning_effort": "high"}
    assert body(False) == {"chat_template_kwargs": {"enable_thinking": False, "thinking": False},
                           "include_reasoning": False}
    assert body(False, M) == {}  # false is accepted by any model
    with pytest.raises(TranslationError, match='"m" does not support thinking'):
        body(True, M)
    with pytest.raises(TranslationError, match='invalid think value: "loud"'):
        body("loud")


def test_logprobs() -> None:
    c = t.chat_request(chat(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=3), M)
    assert (c.body["logprobs"], c.body["top_logprobs"]) == (True, 4)  # one more: see test_top_logprobs_*
    g = t.generate_request(gen(prompt="x", logprobs=True, top_logprobs=3), M)
    assert (g.body["logprobs"], g.body["top_logprobs"]) == (True, 4)
    for k, asked in ((0, 0), (19, 20), (20, 20)):  # 20 is vLLM's most
        c = t.chat_request(chat(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=k), M)
        assert c.body["top_logprobs"] == asked
    g = t.generate_request(gen(prompt="x", raw=True, logprobs=True, top_logprobs=2), M)
    assert g.body["logprobs"] == 2  # completions: the number of top logprobs
    assert "logprobs" not in t.generate_request(gen(prompt="x", top_logprobs=2), M).body
    with pytest.raises(TranslationError, match="top_logprobs must be between 0 and 20"):
        t.chat_request(chat(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21), M)


def _lp(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def test_top_logprobs_are_the_k_most_likely_sorted() -> None:
    """vLLM's chat API lists the sampled token first, then the most likely ones, k in all (here
    k+1, as asked): Ollama's top_logprobs are the k most likely, most likely first."""
    sampled = _lp("tent", -6.6)
    chat_lp = {"content": [{**sampled, "top_logprobs": [sampled, _lp("a", -5.8), _lp(" t", -5.9), _lp("b", -6.0)]}]}
    chunk = {"choices": [{"index": 0, "delta": {"content": "tent"}, "logprobs": chat_lp, "finish_reason": None}]}
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "tent"}, "logprobs": chat_lp,
                          "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    top3 = [("a", -5.8), (" t", -5.9), ("b", -6.0)]

    def tops(out: Any) -> list[tuple[str, float]]:
        return [(e.token, e.logprob) for e in out.logprobs[0].top_logprobs]

    assert tops(t.ChatStream("m", Timing(0), top_logprobs=3).chunk(chunk, 1)) == top3
    assert tops(t.ChatStream("m", Timing(0), top_logprobs=3).whole(whole, 1)) == top3
    assert tops(t.GenerateStream("m", Timing(0), top_logprobs=3).chunk(chunk, 1)) == top3
    assert tops(t.GenerateStream("m", Timing(0), top_logprobs=3).whole(whole, 1)) == top3
    assert t.ChatStream("m", Timing(0), top_logprobs=0).chunk(chunk, 1).logprobs[0].top_logprobs is None
    # Completions (raw, template, context): the sampled token and the k most likely, by text.
    comp_lp = {"tokens": ["tent"], "token_logprobs": [-6.6],
               "top_logprobs": [{"tent": -6.6, "a": -5.8, " t": -5.9, "b": -6.0}]}
    comp = {"choices": [{"index": 0, "text": "tent", "logprobs": comp_lp, "finish_reason": None}]}
    assert tops(t.GenerateStream("m", Timing(0), top_logprobs=3).chunk(comp, 1)) == top3
    # logprobs without top_logprobs: vLLM's completions still list the sampled token; Ollama lists none
    assert t.GenerateStream("m", Timing(0), top_logprobs=0).chunk(comp, 1).logprobs[0].top_logprobs is None


# --- requests: chat, tools ---------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_chat_golden_with_a_tool_round_trip() -> None:
    """The history the ollama client sends after running a tool → OpenAI's shape, results matched to calls."""
    req = chat(stream=False, tools=[WEATHER], options={"seed": 1}, messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Tokyo and Paris?"},
        {"role": "assistant", "content": "", "thinking": "Two cities: two calls.", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        {"role": "tool", "content": "rain", "tool_name": "get_weather"},
        {"role": "USER", "content": "Thanks"},
    ])
    call = t.chat_request(req, THINKER)
    assert call.path == "/v1/chat/completions"
    assert call.body == {
        "model": "q:latest",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Tokyo and Paris?"},
            {"role": "assistant", "content": "", "reasoning": "Two cities: two calls.", "tool_calls": [
                {"id": "call_000000000", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}},
                {"id": "call_000000001", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_000000000", "name": "get_weather"},
            {"role": "tool", "content": "rain", "tool_call_id": "call_000000001", "name": "get_weather"},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [WEATHER],
        "chat_template_kwargs": {"enable_thinking": True, "thinking": True},  # think unset: on, as in Ollama
        "seed": 1, "stream": False,
    }


def test_tool_results_match_their_calls() -> None:
    def ids(messages: list[dict[str, Any]]) -> list[str | None]:
        body = t.chat_request(chat(messages=messages), THINKER).body
        return [m.get("tool_call_id") for m in body["messages"] if m["role"] == "tool"]

    calls = {"role": "assistant", "tool_calls": [
        {"id": "chatcmpl-tool-a", "function": {"name": "a", "arguments": {}}},
        {"id": "chatcmpl-tool-b", "function": {"name": "b", "arguments": "{\"x\": 1}"}}]}
    # By name, whatever the order; vLLM's ids are kept when the client sends them back.
    assert ids([calls, {"role": "tool", "content": "B", "tool_name": "b"},
                {"role": "tool", "content": "A", "tool_name": "a"}]) == ["chatcmpl-tool-b", "chatcmpl-tool-a"]
    # No name: the oldest unanswered call.
    assert ids([calls, {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]) == [
        "chatcmpl-tool-a", "chatcmpl-tool-b"]
    # An explicit id wins.
    assert ids([calls, {"role": "tool", "content": "B", "tool_call_id": "chatcmpl-tool-b", "tool_name": "a"}]) == [
        "chatcmpl-tool-b"]
    # A result nothing asked for keeps no id.
    assert ids([{"role": "user", "content": "x"}, {"role": "tool", "content": "?", "tool_name": "a"}]) == [None]


def test_generated_call_ids_are_stable_across_turns() -> None:
    turn = [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}]},
            {"role": "tool", "content": "1", "tool_name": "a"}]
    first = t.chat_request(chat(messages=turn), THINKER).body["messages"]
    later = t.chat_request(chat(messages=[*turn, {"role": "assistant", "content": "ok"},
                                          {"role": "user", "content": "again"}]), THINKER).body["messages"]
    assert later[:3] == first  # same prefix, so vLLM's prefix cache stays warm


def test_tools_need_a_tool_parser() -> None:
    with pytest.raises(TranslationError, match='"m" does not support tools'):
        t.chat_request(chat(messages=[{"role": "user", "content": "x"}], tools=[WEATHER]), M)
    # The ollama client always sends `tools: []`: that is no tools.
    assert "tools" not in t.chat_request(chat(messages=[{"role": "user", "content": "x"}], tools=[]), M).body


# --- responses: generate ----------------------------------------------------------------------


def test_golden_chat_stream_as_generate() -> None:
    state = t.GenerateStream("tiny", Timing(start=0, upstream=10), want_context=True)
    assert lines(state, sse("chat_lp.sse")) == [
        {"model": "tiny", "response": "", "done": False, "logprobs": [
            {"token": "", "logprob": -5.848265171051025, "bytes": [], "top_logprobs": [
                {"token": "", "logprob": -5.848265171051025, "bytes": []},
                {"token": " t", "logprob": -5.981077671051025, "bytes": [32, 116]}]}]},
        {"model": "tiny", "response": "", "done": False, "logprobs": [
            {"token": "", "logprob": -5.958957195281982, "bytes": [], "top_logprobs": [
                {"token": "", "logprob": -5.958957195281982, "bytes": []},
                {"token": "", "logprob": -5.974582195281982, "bytes": []}]}]},
        {"model": "tiny", "response": "", "done": True, "done_reason": "length",
         "context": [1, 3, 89, 87, 266, 203, 652, 4, 203, 3, 316, 87, 833, 88, 203, 182, 165],
         "prompt_eval_count": 15, "eval_count": 2},
    ]


def test_golden_chat_stream_text_and_usage() -> None:
    state = t.GenerateStream("tiny", Timing(start=0, upstream=10))
    assert lines(state, sse("chat.sse")) == [
        {"model": "tiny", "response": "��xt", "done": False},
        {"model": "tiny", "response": "", "done": True, "done_reason": "length", "prompt_eval_count": 15,
         "eval_count": 3},
    ]


def test_golden_completion_stream_raw() -> None:
    state = t.GenerateStream("tiny", Timing(start=0))
    assert lines(state, sse("comp.sse")) == [
        {"model": "tiny", "response": "2", "done": False},
        {"model": "tiny", "response": "2", "done": False},
        {"model": "tiny", "response": "", "done": True, "done_reason": "length", "prompt_eval_count": 2,
         "eval_count": 2},
    ]


def test_golden_completion_logprobs_stream() -> None:
    out = lines(t.GenerateStream("tiny", Timing(start=0)), sse("comp_lp.sse"))
    assert out[0]["logprobs"] == [{"token": "2", "logprob": -5.687739372253418, "bytes": [50],
                                   "top_logprobs": [{"token": "2", "logprob": -5.687739372253418, "bytes": [50]}]}]


def test_golden_completion_whole_with_context_and_logprobs() -> None:
    state = t.GenerateStream("tiny", Timing(start=0, upstream=1), want_context=True)
    out = strip(msgspec.to_builtins(state.whole(golden("comp.json"), 100)))
    assert out == {
        "model": "tiny", "response": "22", "done": True, "done_reason": "length", "context": [1, 652, 22, 22],
        "logprobs": [
            {"token": "2", "logprob": -5.687739372253418, "bytes": [50], "top_logprobs": [
                {"token": "2", "logprob": -5.687739372253418, "bytes": [50]},
                {"token": "\u0010", "logprob": -6.054926872253418, "bytes": [16]}]},
            {"token": "2", "logprob": -5.7956366539001465, "bytes": [50], "top_logprobs": [
                {"token": "2", "logprob": -5.7956366539001465, "bytes": [50]},
                {"token": " domestic", "logprob": -6.0846991539001465, "bytes": list(b" domestic")}]}],
        "prompt_eval_count": 2, "eval_count": 2,
    }


def test_golden_chat_whole_as_generate() -> None:
    out = strip(msgspec.to_builtins(t.GenerateStream("tiny", Timing(start=0)).whole(golden("chat.json"), 9)))
    assert out == {"model": "tiny", "response": "��xt", "done": True, "done_reason": "length",
                   "prompt_eval_count": 15, "eval_count": 3}


def test_thinking_in_generate() -> None:
    state = t.GenerateStream("q", Timing(start=0))
    events = [{"choices": [{"index": 0, "delta": {"reasoning": "hmm"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"content": "4"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]
    assert lines(state, events) == [
        {"model": "q", "response": "", "thinking": "hmm", "done": False},
        {"model": "q", "response": "4", "done": False},
        {"model": "q", "response": "", "done": True, "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2},
    ]


# --- responses: chat -------------------------------------------------------------------------


def test_golden_tool_call_stream() -> None:
    """vLLM's hermes parser streams argument fragments; Ollama gets each call whole, as soon as complete."""
    out = lines(t.ChatStream("tiny", Timing(start=0)), sse("tool.sse"))
    weather_id = sse("tool.sse")[1]["choices"][0]["delta"]["tool_calls"][0]["id"]
    time_id = next(e["choices"][0]["delta"]["tool_calls"][0]["id"] for e in sse("tool.sse")[2:]
                   if e["choices"] and e["choices"][0]["delta"].get("tool_calls", [{}])[0].get("id"))
    assert out == [
        {"model": "tiny", "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}, "index": 0}, "id": weather_id}]},
         "done": False},
        {"model": "tiny", "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_time", "arguments": {}, "index": 1}, "id": time_id}]}, "done": False},
        {"model": "tiny", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         "prompt_eval_count": 280, "eval_count": 82},
    ]


def test_golden_tool_call_whole() -> None:
    body = golden("tool.json")
    out = strip(msgspec.to_builtins(t.ChatStream("tiny", Timing(start=0)).whole(body, 9)))
    ids = [c["id"] for c in body["choices"][0]["message"]["tool_calls"]]
    assert out == {
        "model": "tiny", "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}, "index": 0}, "id": ids[0]},
            {"function": {"name": "get_time", "arguments": {}, "index": 1}, "id": ids[1]}]},
        "done": True, "done_reason": "stop", "prompt_eval_count": 280, "eval_count": 94,
    }
    parsed = ollama.ChatResponse.model_validate(msgspec.to_builtins(t.ChatStream("t", Timing(0)).whole(body, 9)))
    assert parsed.message.tool_calls[0].function.arguments == {"city": "Tokyo"}


def test_golden_chat_stream_and_whole() -> None:
    assert lines(t.ChatStream("tiny", Timing(start=0)), sse("chat.sse")) == [
        {"model": "tiny", "message": {"role": "assistant", "content": "��xt"}, "done": False},
        {"model": "tiny", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "length",
         "prompt_eval_count": 15, "eval_count": 3},
    ]
    whole = strip(msgspec.to_builtins(t.ChatStream("tiny", Timing(start=0)).whole(golden("chat_lp.json"), 9)))
    assert whole["message"] == {"role": "assistant", "content": ""}
    assert [lp["logprob"] for lp in whole["logprobs"]] == [-5.848265171051025, -5.958957195281982]


def test_thinking_in_chat_and_malformed_arguments_kept() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": None, "reasoning": "Let me see"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Yes"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                            "function": {"name": "f", "arguments": "{oops"}}]},
                      "finish_reason": "tool_calls"}]},
    ]
    assert lines(t.ChatStream("q", Timing(start=0)), events) == [
        {"model": "q", "message": {"role": "assistant", "content": "", "thinking": "Let me see"}, "done": False},
        {"model": "q", "message": {"role": "assistant", "content": "Yes"}, "done": False},
        {"model": "q", "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": {"arguments": "{oops"}, "index": 0}, "id": "c1"}]},
         "done": False},
        {"model": "q", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
    ]


def test_abort_is_an_error_not_a_silent_stop() -> None:
    with pytest.raises(t.StreamAborted):
        t.ChatStream("q", Timing(start=0)).chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "abort"}]}, 1)


# --- responses: metrics and wire conformance ---------------------------------------------------


def test_durations_are_the_routers_or_vllms_own() -> None:
    state = t.ChatStream("m", Timing(start=1_000, upstream=3_000))
    state.chunk({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}, 10_000)
    state.chunk({"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]}, 15_000)
    state.chunk({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}, 16_000)
    done = state.done(20_000)
    assert (done.total_duration, done.load_duration, done.prompt_eval_duration, done.eval_duration) == (
        19_000, 2_000, 7_000, 5_000)
    assert (done.prompt_eval_count, done.eval_count) == (4, 2)
    # vLLM started with --enable-per-request-metrics reports its own prefill and decode times.
    state = t.ChatStream("m", Timing(start=0))
    state.chunk({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2},
                 "metrics": {"time_to_first_token_ms": 12.5, "generation_time_ms": 3.0}}, 1)
    done = state.done(2)
    assert (done.prompt_eval_duration, done.eval_duration) == (12_500_000, 3_000_000)


def test_created_at_is_rfc3339_utc_with_nanoseconds_trimmed() -> None:
    assert t.rfc3339(1_751_919_739_184_789_000) == "2025-07-07T20:22:19.184789Z"
    assert t.rfc3339(1_751_919_739_000_000_000) == "2025-07-07T20:22:19Z"
    assert t.rfc3339(1_751_919_739_000_000_001) == "2025-07-07T20:22:19.000000001Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", t.rfc3339())


def test_zero_metrics_are_omitted_and_required_keys_kept() -> None:
    c = wire.ChatChunk(model="m", created_at="x", message=wire.OutMessage(role="assistant", content=""), done=False)
    assert msgspec.json.decode(msgspec.json.encode(c)) == {
        "model": "m", "created_at": "x", "message": {"role": "assistant", "content": ""}, "done": False}
    g = wire.GenerateChunk(model="m", created_at="x", response="", done=True, done_reason="stop", eval_count=3)
    assert msgspec.json.decode(msgspec.json.encode(g)) == {
        "model": "m", "created_at": "x", "response": "", "done": True, "done_reason": "stop", "eval_count": 3}


def test_every_translated_response_parses_with_the_ollama_clients_models() -> None:
    for c in lines(t.ChatStream("m", Timing(0)), sse("tool.sse")) + lines(t.ChatStream("m", Timing(0)),
                                                                          sse("chat_lp.sse")):
        ollama.ChatResponse.model_validate({**c, "created_at": t.rfc3339()})
    for c in lines(t.GenerateStream("m", Timing(0), want_context=True), sse("chat_lp.sse")):
        ollama.GenerateResponse.model_validate({**c, "created_at": t.rfc3339()})


# --- context overflow: dropping a chat's oldest messages ---------------------------------------

VLLM_TOO_LONG = ("This model's maximum context length is 1024 tokens. However, your prompt contains 1500 input "
                 "tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
                 "the input prompt. (parameter=input_tokens, value=1500)")


def test_vllms_context_refusals_are_recognised() -> None:
    """vLLM 0.32's words (renderers/params.py, serve/utils/api_utils.get_max_tokens, SamplingParams)."""
    assert t.context_overflow(400, VLLM_TOO_LONG)
    assert t.context_overflow(400, "This model's maximum context length is 1024 tokens. However, your prompt "
                                   "contains 90000 characters (more than 30720 characters, which is the upper "
                                   "bound for 1024 input tokens). Please reduce the length of the input prompt.")
    assert t.context_overflow(400, "Input length (1500) exceeds model's maximum context length (1024).")
    assert t.context_overflow(400, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)")
    assert not t.context_overflow(400, "max_tokens must be at least 1, got -1.")
    assert not t.context_overflow(400, "Conversation roles must alternate user/assistant/user/assistant/...")
    assert not t.context_overflow(500, VLLM_TOO_LONG)
    assert not t.context_overflow(404, "The model `x` does not exist.")


def msgs(*roles: str) -> list[dict[str, Any]]:
    """OpenAI messages: ``a*`` is an assistant turn with tool calls; each content names its place."""
    out: list[dict[str, Any]] = []
    for i, r in enumerate(roles):
        m: dict[str, Any] = {"role": "assistant" if r == "a*" else r, "content": f"{r}{i}"}
        if r == "a*":
            m["tool_calls"] = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        out.append(m)
    return out


def kept(messages: list[dict[str, Any]], drop: int) -> list[str]:
    return [m["content"] for m in t.drop_oldest(messages, drop)]


def test_truncation_cuts_keep_system_messages_and_the_last_message() -> None:
    chat_ = msgs("system", "user", "assistant", "user", "assistant", "user")
    assert t.truncation_cuts(chat_) == [2, 4]  # whole turns: a cut never starts on the assistant
    assert kept(chat_, 2) == ["system0", "user3", "assistant4", "user5"]
    assert kept(chat_, 4) == ["system0", "user5"]
    # system messages anywhere stay, in their place
    chat_ = msgs("user", "assistant", "system", "user", "assistant", "user")
    assert t.truncation_cuts(chat_) == [2, 4]
    assert kept(chat_, 2) == ["system2", "user3", "assistant4", "user5"]
    assert kept(chat_, 4) == ["system2", "user5"]
    # nothing to drop
    assert t.truncation_cuts(msgs("user")) == []
    assert t.truncation_cuts(msgs("system", "user")) == []
    assert t.truncation_cuts(msgs("system", "system", "user")) == []
    assert t.truncation_cuts([]) == []
    # a prefill (last message the assistant's) stays, even alone
    chat_ = msgs("user", "assistant", "user", "assistant")
    assert t.truncation_cuts(chat_) == [2, 3]
    assert kept(chat_, 3) == ["assistant3"]
    # images go with their message
    with_image = [{"role": "user", "content": [{"type": "text", "text": "see"},
                                               {"type": "image_url", "image_url": {"url": "data:,"}}]},
                  {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "and now?"}]
    assert t.drop_oldest(with_image, t.truncation_cuts(with_image)[0]) == [with_image[2]]


def test_truncation_never_parts_tool_results_from_their_call() -> None:
    """Ollama's toolBlockStartIndex: a cut at a tool result moves back to the call."""
    agent = msgs("system", "user", "a*", "tool", "a*", "tool", "tool")
    assert t.truncation_cuts(agent) == [1, 3]
    assert kept(agent, 1) == ["system0", "a*2", "tool3", "a*4", "tool5", "tool6"]
    assert kept(agent, 3) == ["system0", "a*4", "tool5", "tool6"]  # the last block whole, with its call
    # with a user turn after it, a tool block goes whole, and the cut starts on the user
    chat_ = msgs("user", "a*", "tool", "assistant", "user", "assistant", "user")
    assert t.truncation_cuts(chat_) == [4, 6]
    assert kept(chat_, 4) == ["user4", "assistant5", "user6"]
    # a tool result without a call before it (as a client sent it) may lead
    assert t.truncation_cuts(msgs("user", "tool", "tool")) == [1, 2]


def fit(sizes: list[int], roles: list[str], limit: int, max_tokens: int | None = None,
        overhead: int = 3) -> tuple[int | None, int, list[int]]:
    """Run `ContextFit` against a counter: `overhead` + the sizes of the messages kept."""
    messages = [{"role": r, "content": str(n)} for r, n in zip(roles, sizes, strict=True)]
    search = t.ContextFit(t.truncation_cuts(messages), max_tokens, limit)
    probes = []
    while (drop := search.probe()) is not None:
        probes.append(drop)
        search.record(overhead + sum(int(m["content"]) for m in t.drop_oldest(messages, drop)), limit)
    return search.drop, search.room, probes


def test_context_fit_drops_the_fewest_messages_that_leave_room_for_the_answer() -> None:
    roles = ["system"] + ["user", "assistant"] * 10 + ["user"]
    sizes = [50] + [100] * 20 + [40]  # 50 + 2000 + 40 + 3
    # the answer's room: max_tokens when asked …
    drop, room, probes = fit(sizes, roles, limit=1000, max_tokens=300)
    assert room == 300 and drop == 14  # 3 + 50 + 6*100 + 40 = 693 <= 700; one turn more would be 893
    assert len(probes) <= 1 + math.ceil(math.log2(10)) and probes[0] == 20  # the deepest cut first
    # … else ANSWER_ROOM, a quarter of a smaller context …
    assert fit(sizes, roles, limit=1000)[:2] == (14, 250)
    assert fit(sizes, roles, limit=100_000)[:2] == (2, t.ANSWER_ROOM)
    # … never more than the deepest cut leaves
    drop, room, probes = fit(sizes, roles, limit=120, max_tokens=500)
    assert (drop, room) == (20, 27) and len(probes) <= 5
    # not even the system messages and the last message leave a token: one count, no fit
    assert fit(sizes, roles, limit=93) == (None, 0, [20])
    assert fit(sizes, roles, limit=94)[0] == 20
    # nothing to drop: no count at all
    assert fit([5000], ["user"], limit=1000) == (None, 0, [])


def test_context_fit_finds_what_a_linear_search_finds() -> None:
    import random

    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 40)
        roles = [rng.choice(["user", "assistant", "system", "user", "assistant", "tool"]) for _ in range(n)]
        sizes = [rng.randint(0, 200) for _ in range(n)]
        limit, max_tokens = rng.randint(1, 3000), rng.choice([None, rng.randint(1, 2000)])
        messages = [{"role": r, "content": str(s)} for r, s in zip(roles, sizes, strict=True)]
        cuts = t.truncation_cuts(messages)
        drop, room, probes = fit(sizes, roles, limit, max_tokens)
        count = {k: 3 + sum(int(m["content"]) for m in t.drop_oldest(messages, k)) for k in cuts}
        assert len(probes) <= (1 + math.ceil(math.log2(len(cuts))) if cuts else 0)
        if not cuts or count[cuts[-1]] >= limit:
            assert drop is None
            continue
        assert room == max(1, min(max_tokens or min(t.ANSWER_ROOM, max(1, limit // 4)), limit - count[cuts[-1]]))
        assert drop == next(k for k in cuts if count[k] + room <= limit)


def test_the_count_and_the_retry_render_the_chat_as_it_was() -> None:
    req = chat(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
               tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
               think="high", format="json", options={"num_predict": 7, "temperature": 0.1})
    call = t.chat_request(req, THINKER)
    before = json.dumps(call.body)
    tok = t.chat_tokenize_call(call, 2)
    assert tok.path == "/tokenize"
    assert tok.body == {"model": "q:latest", "messages": [call.body["messages"][0], call.body["messages"][3]],
                        "tools": call.body["tools"],
                        "chat_template_kwargs": {"enable_thinking": True, "thinking": True,
                                                 "reasoning_effort": "high"}}
    retry = t.truncated_chat(call, 2)
    assert retry.path == "/v1/chat/completions"
    assert retry.body == {**call.body, "messages": tok.body["messages"]}
    assert json.dumps(call.body) == before  # the original call is left as it was
    prefill = t.chat_request(chat(messages=[{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "b"}]), M)
    tok = t.chat_tokenize_call(prefill, 1)
    assert (tok.body["continue_final_message"], tok.body["add_generation_prompt"]) == (True, False)


# --- embeddings ---------------------------------------------------------------------------------


def test_embed_request_and_response() -> None:
    req = msgspec.convert({"model": "e", "input": ["a", "b"], "dimensions": 2}, wire.EmbedRequest)
    call = t.embed_request(req, EMBEDDER)
    assert (call.path, call.body) == ("/v1/embeddings", {"model": "e:latest", "input": ["a", "b"],
                                                          "truncate_prompt_tokens": -1})
    no_trunc = msgspec.convert({"model": "e", "input": "a", "truncate": False}, wire.EmbedRequest)
    assert t.embed_request(no_trunc, EMBEDDER).body == {"model": "e:latest", "input": ["a"]}
    assert t.embed_inputs(msgspec.convert({"model": "e", "input": ""}, wire.EmbedRequest)) == []
    body = {"data": [{"index": 1, "embedding": [0.0, 3.0, 4.0]}, {"index": 0, "embedding": [3.0, 4.0, 12.0]}],
            "usage": {"prompt_tokens": 5}}
    out = t.embed_response(body, "e", 2, {"total_duration": 7, "load_duration": 1})
    assert out.embeddings == [[0.6, 0.8], [0.0, 1.0]]  # in input order, cut to 2, L2-normalised
    assert (out.prompt_eval_count, out.total_duration, out.load_duration) == (5, 7, 1)
    full = t.embed_response(body, "e", None, {})
    assert math.isclose(sum(x * x for x in full.embeddings[0]), 1.0)
    ollama.EmbedResponse.model_validate(msgspec.to_builtins(out))
    with pytest.raises(TranslationError, match='"m" does not support embeddings'):
        t.embed_request(req, M)


def test_legacy_embeddings_are_not_normalised() -> None:
    req = msgspec.convert({"model": "e", "prompt": "hello"}, wire.EmbeddingsRequest)
    assert t.embeddings_request(req, EMBEDDER).body == {"model": "e:latest", "input": ["hello"],
                                                        "truncate_prompt_tokens": -1, "use_activation": False}
    out = t.embeddings_response({"data": [{"index": 0, "embedding": [3.0, 4.0]}]})
    assert out.embedding == [3.0, 4.0]
    ollama.EmbeddingsResponse.model_validate(msgspec.to_builtins(out))


# --- errors -------------------------------------------------------------------------------------


def test_upstream_error_messages() -> None:
    assert t.upstream_error_message(400, b'{"error":{"message":"bad temp","type":"BadRequestError","code":400}}') \
        == "bad temp"
    assert t.upstream_error_message(400, b'{"object":"error","message":"old style"}') == "old style"
    assert t.upstream_error_message(500, b"Internal Server Error") == "Internal Server Error"
    assert t.upstream_error_message(502, b"") == "upstream returned HTTP 502"


# vLLM 0.32's own message for five stop strings (its validation handler, run on the real request model).
STOP_DUMP = (GOLDEN / "stop_validation_error.txt").read_text()


def test_vllms_validation_dump_becomes_one_readable_line() -> None:
    assert t.readable_error(STOP_DUMP) == "stop: List should have at most 4 items after validation, not 5"
    two_fields = ("2 validation errors:\n"
                  "  {'type': 'literal_error', 'loc': 'body.messages.0.role', "
                  "'msg': \"Input should be 'user' or 'assistant'\", 'input': \"it's\"}\n"
                  "  {'type': 'int_parsing', 'loc': 'body.n', 'msg': 'Input should be a valid integer', 'input': 'x'}")
    assert t.readable_error(two_fields) == \
        "messages.0.role: Input should be 'user' or 'assistant'; n: Input should be a valid integer"
    assert t.readable_error("1 validation error:\n  {'type': 'missing', 'loc': 'body', 'msg': 'Field required'}") \
        == "Field required"
    for other in ("temperature must be non-negative", "2 validation errors:\n  garbled", ""):
        assert t.readable_error(other) == other  # anything else is kept as vLLM wrote it
