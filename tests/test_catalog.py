"""/api/tags, /api/show and /api/ps data from a model's own files (local dir or HF cache)."""

from __future__ import annotations

import json
import math
import struct
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import ollama
import pytest

from router import catalog as cat
from router.config import parse

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
          "bos_token_id": 1, "eos_token_id": 2}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header: dict[str, Any] = {}
    offset = 0
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def write_model(d: Path, template: str = "{{ messages }}") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                          "repetition_penalty": 1.05}))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (d / "LICENSE").write_text("Apache 2.0, say")
    write_safetensors(d / "model.safetensors", {"embed.weight": ("BF16", [100, 64]), "lm_head.weight": ("BF16", [100, 64]),
                                                "norm.weight": ("BF16", [64])})
    return d


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m")


def test_tags_and_show_from_a_local_directory(model_dir: Path, tmp_path: Path) -> None:
    config = parse({"models": [{"name": "m", "source": str(model_dir), "max_model_len": 1024,
                                "tool_call_parser": "hermes"}]}, base_dir=tmp_path)
    c = cat.Catalog(config)
    listed = c.tags().models[0]
    assert listed.name == listed.model == "m:latest"
    assert listed.size == sum(p.stat().st_size for p in model_dir.iterdir())
    assert len(listed.digest) == 64
    assert listed.download == "local"
    details = listed.details
    assert (details.format, details.family, details.families) == ("safetensors", "llama", ["llama"])
    assert details.parameter_size == "13K"  # 100*64*2 + 64 parameters, from the safetensors header
    assert details.quantization_level == "BF16"
    datetime.fromisoformat(listed.modified_at)  # local time with offset

    show = c.show("m", verbose=True)
    assert show is not None
    assert show.template == "{{ messages }}"
    assert show.capabilities == ["completion", "tools"]
    assert show.license == "Apache 2.0, say"
    assert show.model_info == {
        "general.architecture": "llama", "general.parameter_count": 100 * 64 * 2 + 64,
        "llama.context_length": 2048, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 100,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    assert show.parameters.splitlines() == [
        f"{'num_ctx':<30} 1024", f"{'temperature':<30} 0.6", f"{'top_p':<30} 0.9", f"{'top_k':<30} 20",
        f"{'repeat_penalty':<30} 1.05"]
    assert "FROM " in show.modelfile and 'TEMPLATE """{{ messages }}"""' in show.modelfile
    assert {t.name for t in show.tensors or ()} == {"embed.weight", "lm_head.weight", "norm.weight"}
    # The official client's models accept every field.
    ollama.ShowResponse.model_validate(msgspec.to_builtins(show))
    ollama.ListResponse.model_validate(msgspec.to_builtins(c.tags()))
    assert c.show("nope") is None
    assert cat.context_length(config, config.models[0]) == 1024


def test_a_model_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    commit = "a" * 40
    storage = cache / "models--org--tiny"
    write_model(storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    config = parse({"models": [{"name": "t", "source": "org/tiny", "embedding": True}]})
    c = cat.Catalog(config)
    listed = c.tags().models[0]
    assert listed.details.family == "llama" and listed.size > 0
    assert listed.download in ("downloaded", "partial")  # a hand-made snapshot has no pull manifest
    missing = parse({"models": [{"name": "n", "source": "org/absent"}]})
    assert cat.Catalog(missing).tags().models[0].download == "not downloaded"
    show = c.show("t")
    assert show is not None and show.capabilities == ["embedding"]
    assert cat.context_length(config, config.models[0]) == 2048  # no max_model_len: config.json's


def test_nothing_is_invented_without_files(tmp_path: Path) -> None:
    config = parse({"models": [{"name": "r", "source": "org/elsewhere", "url": "http://127.0.0.1:9"}]})
    c = cat.Catalog(config)
    listed = c.tags().models[0]
    assert (listed.size, listed.digest, listed.details.family, listed.details.parameter_size) == (0, "", "", "")
    assert listed.download == "remote"
    show = c.show("r")
    assert show is not None and show.model_info == {} and show.template == "" and show.capabilities == ["completion"]


def test_ps_reports_ready_models_with_measured_memory(model_dir: Path, tmp_path: Path) -> None:
    import os

    from router.lifecycle import State

    config = parse({"engine": {"device": "cpu"}, "models": [
        {"name": "m", "source": str(model_dir)},
        {"name": "idle", "source": str(model_dir), "load": "on_demand", "keep_alive": "5m"},
        {"name": "off", "source": str(model_dir)}]}, base_dir=tmp_path)
    now = time.time()
    runtimes = {
        "m:latest": SimpleNamespace(model=config.models[0], state=State.READY, always=True, keep_alive=300.0,
                                    expires_at=None, pid=os.getpid()),
        "idle:latest": SimpleNamespace(model=config.models[1], state=State.READY, always=False, keep_alive=300.0,
                                       expires_at=now + 120, pid=None),
        "off:latest": SimpleNamespace(model=config.models[2], state=State.STOPPED, always=True, keep_alive=300.0,
                                      expires_at=None, pid=None),
    }
    c = cat.Catalog(config)
    c.attach(SimpleNamespace(config=config, runtimes=runtimes))  # type: ignore[arg-type]
    ps = {m.model: m for m in c.ps().models}
    assert set(ps) == {"m:latest", "idle:latest"}
    m = ps["m:latest"]
    assert m.size > 10 * 1024 * 1024 and m.size_vram == 0  # this process's RSS, measured; CPU mode
    assert m.context_length == 2048
    assert datetime.fromisoformat(m.expires_at).year > 2200
    idle = ps["idle:latest"]
    assert idle.size == 0  # no process to measure: 0, not a guess
    assert abs(datetime.fromisoformat(idle.expires_at).timestamp() - (now + 120)) < 1
    ollama.ProcessResponse.model_validate(msgspec.to_builtins(c.ps()))
