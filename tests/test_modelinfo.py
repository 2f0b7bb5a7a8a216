"""Model facts from local files: safetensors headers, config.json, tokenizer files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from router import modelinfo as mi
from router.placement import ModelFacts

LLAMA_8B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def single(tmp_path: Path) -> Path:
    save_file(
        {
            "embed.weight": torch.zeros(100, 16, dtype=torch.bfloat16),
            "layer.weight": torch.zeros(16, 16, dtype=torch.bfloat16),
            "norm.weight": torch.zeros(16, dtype=torch.float32),
        },
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    write_json(tmp_path / "config.json", {**LLAMA_8B, "num_hidden_layers": 2})
    return tmp_path


def test_single_file_weights(single: Path) -> None:
    w = mi.read_weights(single)
    assert w is not None and w.files == 1
    assert w.bytes == (1600 + 256) * 2 + 16 * 4
    assert w.elements == 1600 + 256 + 16
    assert w.dtype == "BF16" and w.by_dtype == {"BF16": 1856, "F32": 16}
    assert mi.weights_bytes(single) == w.bytes
    assert mi.parameter_count(single) == 1872
    assert mi.weights_dtype(single) == "BF16"


def test_sharded_weights_follow_the_index(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(10, 10, dtype=torch.float16)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(5, dtype=torch.float16)}, tmp_path / "model-00002-of-00002.safetensors")
    # A stray file the index does not name (e.g. consolidated weights) must not be counted.
    save_file({"c": torch.zeros(1000, dtype=torch.float16)}, tmp_path / "consolidated.safetensors")
    write_json(
        tmp_path / "model.safetensors.index.json",
        {
            "metadata": {"total_size": 210},
            "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
        },
    )
    w = mi.read_weights(tmp_path)
    assert w is not None and (w.files, w.bytes, w.elements) == (2, 210, 105)
    assert mi.parameter_count(tmp_path) == 105


def test_total_parameters_from_the_index_wins(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(4, dtype=torch.float16)}, tmp_path / "m.safetensors")
    write_json(
        tmp_path / "model.safetensors.index.json",
        {"metadata": {"total_parameters": 8030261248}, "weight_map": {"a": "m.safetensors"}},
    )
    assert mi.parameter_count(tmp_path) == 8030261248
    assert mi.weights_bytes(tmp_path) == 8


def test_packed_int4_weights_are_unpacked_when_bits_are_known(tmp_path: Path) -> None:
    save_file(
        {
            "l.qweight": torch.zeros(64, 8, dtype=torch.int32),  # 512 int32 = 4096 int4 weights
            "l.scales": torch.zeros(8, dtype=torch.float16),
        },
        tmp_path / "model.safetensors",
    )
    assert mi.parameter_count(tmp_path, config={}) is None  # bits unknown: no guess
    cfg = {"quantization_config": {"quant_method": "awq", "bits": 4}}
    assert mi.parameter_count(tmp_path, config=cfg) == 4096 + 8
    write_json(tmp_path / "config.json", cfg)
    assert mi.parameter_count(tmp_path) == 4104
    assert mi.weights_bytes(tmp_path) == 512 * 4 + 8 * 2  # memory is bytes, not parameters


def test_unreadable_weights_are_unknown(tmp_path: Path) -> None:
    assert mi.read_weights(tmp_path) is None and mi.weights_bytes(tmp_path) is None
    assert mi.parameter_count(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    assert mi.weights_bytes(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # absurd header length
    assert mi.safetensors_header(tmp_path / "model.safetensors") is None
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    assert mi.weights_bytes(tmp_path) is None


def test_header_is_read_without_reading_tensors(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2, 3, dtype=torch.float32)}, tmp_path / "a.safetensors", metadata={"k": "v"})
    h = mi.safetensors_header(tmp_path / "a.safetensors")
    assert h is not None and h["__metadata__"] == {"k": "v"}
    assert h["x"]["dtype"] == "F32" and h["x"]["shape"] == [2, 3] and h["x"]["data_offsets"] == [0, 24]


# --- config facts -----------------------------------------------------------------


def test_kv_bytes_per_token_llama_8b() -> None:
    assert mi.kv_bytes_per_token(LLAMA_8B) == 128 * 1024  # 2 × 32 layers × 8 heads × 128 × 2 bytes
    assert mi.kv_bytes_per_token(LLAMA_8B, tp=2) == 64 * 1024
    assert mi.kv_bytes_per_token(LLAMA_8B, tp=16) == 16 * 1024  # at least one head per GPU
    assert mi.kv_bytes_per_token(LLAMA_8B, dtype_bytes=1) == 64 * 1024  # fp8 KV cache


def test_kv_bytes_per_token_variants() -> None:
    explicit_head_dim = {**LLAMA_8B, "head_dim": 256, "num_key_value_heads": 4}
    assert mi.kv_bytes_per_token(explicit_head_dim) == 2 * 32 * 4 * 256 * 2
    no_gqa = {k: v for k, v in LLAMA_8B.items() if k != "num_key_value_heads"}
    assert mi.kv_bytes_per_token(no_gqa) == 2 * 32 * 32 * 128 * 2
    transformers5 = {**{k: v for k, v in LLAMA_8B.items() if k != "torch_dtype"}, "dtype": "float32"}
    assert mi.kv_bytes_per_token(transformers5) == 256 * 1024
    multimodal = {"model_type": "llava", "torch_dtype": "bfloat16", "text_config": {**LLAMA_8B}}
    assert mi.kv_bytes_per_token(multimodal) == 128 * 1024
    mla = {"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "torch_dtype": "bfloat16"}
    assert mi.kv_bytes_per_token(mla) == 61 * 576 * 2
    assert mi.kv_bytes_per_token({"num_hidden_layers": 2}) is None  # no dtype, no heads
    assert mi.kv_bytes_per_token(None) is None


def test_context_family_labels() -> None:
    assert mi.max_context_length(LLAMA_8B) == 131072
    assert mi.max_context_length({"n_positions": 1024}) == 1024
    assert mi.max_context_length({}) is None
    assert mi.family(LLAMA_8B) == "llama" and mi.family({}) is None and mi.family(None) is None


@pytest.mark.parametrize(
    ("n", "label"),
    [
        (8030261248, "8.0B"),
        (3212749824, "3.2B"),
        (7_000_000_000, "7B"),
        (70_553_706_496, "70.6B"),
        (494032768, "494.03M"),
        (8_000_000, "8M"),
        (1500, "2K"),
        (999, "999"),
        (None, None),
    ],
)
def test_parameter_size_label_like_ollama(n: int | None, label: str | None) -> None:
    assert mi.parameter_size_label(n) == label


def test_quantization_level() -> None:
    assert mi.quantization_level({"quantization_config": {"quant_method": "awq", "bits": 4}}) == "AWQ-INT4"
    assert mi.quantization_level({"quantization_config": {"quant_method": "gptq", "bits": 8}}) == "GPTQ-INT8"
    assert mi.quantization_level({"quantization_config": {"quant_method": "fp8"}}) == "FP8"
    ct = {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4}}}}
    assert mi.quantization_level({"quantization_config": ct}) == "COMPRESSED-TENSORS-INT4"
    assert mi.quantization_level(LLAMA_8B, "BF16") == "BF16"
    assert mi.quantization_level(LLAMA_8B) is None


def test_model_facts_from_dir(single: Path) -> None:
    f = ModelFacts.from_dir(single)
    assert f.weights_bytes == mi.weights_bytes(single)
    assert f.max_context == 131072
    assert f.kv_per_token(1) == 2 * 2 * 8 * 128 * 2
    assert ModelFacts.from_dir(single / "nope") == ModelFacts()


# --- chat template, size on disk ----------------------------------------------------


def test_chat_template_sources(tmp_path: Path) -> None:
    assert mi.chat_template(tmp_path) is None
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": "from-tokenizer-config"})
    assert mi.chat_template(tmp_path) == "from-tokenizer-config"
    write_json(
        tmp_path / "tokenizer_config.json",
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]},
    )
    assert mi.chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    assert mi.chat_template(tmp_path) == "from-jinja"


def test_size_on_disk_counts_linked_blobs_once(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "1").write_bytes(b"x" * 100)
    (blobs / "2").write_bytes(b"y" * 50)
    os.symlink(blobs / "1", snap / "model.safetensors")
    os.symlink(blobs / "2", snap / "config.json")
    os.symlink(blobs / "1", snap / "again.safetensors")
    assert mi.size_on_disk(snap) == 150
    assert mi.size_on_disk(tmp_path / "missing") is None


def test_read_config(single: Path, tmp_path: Path) -> None:
    assert mi.read_config(single)["model_type"] == "llama"  # type: ignore[index]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("[1, 2]")
    assert mi.read_config(tmp_path / "x") is None
