"""Facts about a model read from its local files: no network, no tensors loaded.

The planner needs the weights' size and the KV cache's bytes per token to
reject a budget that cannot work *before* vLLM spends minutes finding out;
/api/show and /api/tags need the family, parameter count, quantization and chat
template. All of it is in config.json, tokenizer_config.json and the JSON
header at the start of each ``*.safetensors`` file (8-byte little-endian length,
then ``{name: {dtype, shape, data_offsets}}``), so reading a 140 GB model costs
a few kilobytes of I/O.

Every function returns None when the files do not say: a wrong number here
becomes a wrong refusal or a wrong label, an absent one is shown as unknown.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]

# Bits per element of each safetensors dtype.
DTYPE_BITS: dict[str, int] = {
    "F64": 64, "I64": 64, "U64": 64,
    "F32": 32, "I32": 32, "U32": 32,
    "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I8": 8, "U8": 8, "BOOL": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip

# config.json's torch dtype names → bytes per element.
TORCH_DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "float64": 8, "double": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip

_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses larger headers


def read_json(path: StrPath) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(model_dir: StrPath) -> dict[str, Any] | None:
    """config.json as a dict, or None."""
    return read_json(Path(model_dir) / "config.json")


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it under text_config)."""
    sub = config.get("text_config")
    return sub if isinstance(sub, Mapping) else config


# --- safetensors ------------------------------------------------------------


def safetensors_header(path: StrPath) -> dict[str, Any] | None:
    """The JSON header of one .safetensors file, without reading its tensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                return None
            raw = f.read(n)
    except OSError:
        return None
    if len(raw) != n:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def safetensors_files(model_dir: StrPath) -> list[Path]:
    """The weight files vLLM would load: the shards named by the index, else every top-level *.safetensors."""
    d = Path(model_dir)
    index = read_json(d / "model.safetensors.index.json")
    if index is not None and isinstance(index.get("weight_map"), dict):
        names = sorted({str(v) for v in index["weight_map"].values()})
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


@dataclass(frozen=True)
class Weights:
    """What the safetensors headers say about a model's weights."""

    files: int
    bytes: int
    """Exact bytes of tensor data (from data_offsets): what the weights take in memory unquantized-as-stored."""
    elements: int
    """Elements stored; packed int4 weights count 8 per int32, see `parameters`."""
    by_dtype: dict[str, int] = field(default_factory=dict)
    """Elements per safetensors dtype."""
    packed: dict[str, int] = field(default_factory=dict)
    """Elements per dtype of tensors that look bit-packed (``*.qweight``, ``*.weight_packed``)."""

    @property
    def dtype(self) -> str | None:
        """The dtype holding most elements, e.g. "BF16"."""
        if not self.by_dtype:
            return None
        return max(sorted(self.by_dtype), key=lambda k: self.by_dtype[k])


def read_weights(model_dir: StrPath) -> Weights | None:
    """Sum the safetensors headers of `model_dir`; None if there are none or one is unreadable."""
    files = safetensors_files(model_dir)
    if not files:
        return None
    total_bytes = 0
    elements = 0
    by_dtype: dict[str, int] = {}
    packed: dict[str, int] = {}
    for path in files:
        header = safetensors_header(path)
        if header is None:
            return None
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, dict):
                continue
            try:
                begin, end = t["data_offsets"]
                shape = [int(x) for x in t["shape"]]
                dtype = str(t["dtype"])
            except (KeyError, TypeError, ValueError):
                return None
            n = math.prod(shape)
            total_bytes += int(end) - int(begin)
            elements += n
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
            if name.endswith(("qweight", "weight_packed")) and dtype.startswith(("I", "U")):
                packed[dtype] = packed.get(dtype, 0) + n
    return Weights(len(files), total_bytes, elements, by_dtype, packed)


def weights_bytes(model_dir: StrPath) -> int | None:
    """Bytes of tensor data in the safetensors files: the memory the weights need (all GPUs together)."""
    w = read_weights(model_dir)
    return None if w is None else w.bytes


def weights_dtype(model_dir: StrPath) -> str | None:
    """The dominant stored dtype, e.g. "BF16"."""
    w = read_weights(model_dir)
    return None if w is None else w.dtype


def quant_bits(config: Mapping[str, Any] | None) -> int | None:
    """Weight bits from quantization_config (GPTQ/AWQ ``bits``, compressed-tensors ``num_bits``)."""
    q = (config or {}).get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    for key in ("bits", "w_bit", "weight_bits"):
        if isinstance(q.get(key), int):
            return q[key]
    groups = q.get("config_groups")
    if isinstance(groups, Mapping):
        for g in groups.values():
            w = g.get("weights") if isinstance(g, Mapping) else None
            if isinstance(w, Mapping) and isinstance(w.get("num_bits"), int):
                return w["num_bits"]
    if q.get("load_in_4bit"):
        return 4
    if q.get("load_in_8bit"):
        return 8
    return None


def parameter_count(model_dir: StrPath, config: Mapping[str, Any] | None = None) -> int | None:
    """Number of parameters.

    Prefers ``metadata.total_parameters`` of the shard index (written by recent
    transformers); else counts elements in the headers, unpacking int4/int8
    weights packed into int32 when the config says how many bits they have.
    Packed weights with unknown bits make the count unknown rather than wrong.
    """
    index = read_json(Path(model_dir) / "model.safetensors.index.json")
    meta = (index or {}).get("metadata")
    if isinstance(meta, Mapping) and isinstance(meta.get("total_parameters"), int):
        return int(meta["total_parameters"])
    w = read_weights(model_dir)
    if w is None:
        return None
    if not w.packed:
        return w.elements
    if config is None:
        config = read_config(model_dir)
    bits = quant_bits(config)
    if not bits:
        return None
    extra = sum(n * (DTYPE_BITS.get(dt, bits) // bits - 1) for dt, n in w.packed.items())
    return w.elements + extra


# --- config facts -------------------------------------------------------------


def config_dtype_bytes(config: Mapping[str, Any]) -> int | None:
    """Bytes per element of the dtype the config declares (``torch_dtype``, or ``dtype`` in transformers 5)."""
    for c in (config, text_config(config)):
        for key in ("torch_dtype", "dtype"):
            v = c.get(key)
            if isinstance(v, str):
                b = TORCH_DTYPE_BYTES.get(v.removeprefix("torch."))
                if b:
                    return b
    return None


def kv_bytes_per_token(
    config: Mapping[str, Any] | None, tp: int = 1, dtype_bytes: int | None = None
) -> int | None:
    """KV cache bytes one token takes on one GPU of a tensor-parallel group of `tp`.

    2 (K and V) × layers × KV heads per GPU (kv_heads / tp, at least 1: vLLM
    replicates a head when tp exceeds the head count) × head_dim × dtype bytes.
    MLA models (DeepSeek: ``kv_lora_rank``) cache one latent per layer instead.
    Sliding-window and hybrid models need less; this over-states them, the safe
    direction for a minimum. `dtype_bytes` defaults to the config's dtype (the
    KV cache's dtype in vLLM unless --kv-cache-dtype says otherwise).
    """
    if not config:
        return None
    c = text_config(config)
    b = dtype_bytes or config_dtype_bytes(config)
    layers = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
    if not isinstance(layers, int) or not b:
        return None
    tp = max(1, tp)
    rank = c.get("kv_lora_rank")
    if isinstance(rank, int):
        rope = c.get("qk_rope_head_dim") or 0
        return layers * (rank + int(rope)) * b
    heads = c.get("num_attention_heads") or c.get("n_head")
    kv_heads = c.get("num_key_value_heads") or c.get("num_kv_heads") or heads
    head_dim = c.get("head_dim")
    if not isinstance(head_dim, int):
        hidden = c.get("hidden_size") or c.get("n_embd")
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            return None
        head_dim = hidden // heads
    if not isinstance(kv_heads, int) or kv_heads <= 0:
        return None
    return 2 * layers * max(1, kv_heads // tp) * head_dim * b


def max_context_length(config: Mapping[str, Any] | None) -> int | None:
    """The context length vLLM uses when max_model_len is not set (``max_position_embeddings``).

    RoPE-scaled models may get more from vLLM; set max_model_len for them.
    """
    if not config:
        return None
    c = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length"):
        v = c.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def family(config: Mapping[str, Any] | None) -> str | None:
    """Ollama's "family": the architecture's short name, config.json's ``model_type`` (llama, qwen2, …)."""
    if not config:
        return None
    v = config.get("model_type")
    return v if isinstance(v, str) and v else None


def parameter_size_label(n: int | None) -> str | None:
    """Ollama's parameter_size label: 8030261248 → "8.0B", 494032768 → "494.03M", 7000000000 → "7B"."""
    if n is None or n < 0:
        return None
    if n >= 1_000_000_000:
        v = n / 1_000_000_000
        return f"{v:.0f}B" if v == math.floor(v) else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1_000_000
        return f"{v:.0f}M" if v == math.floor(v) else f"{v:.2f}M"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def quantization_level(config: Mapping[str, Any] | None, dtype: str | None = None) -> str | None:
    """A label in the spirit of Ollama's (Q4_K_M, F16): ``AWQ-INT4``, ``FP8``, or the weights' dtype (``BF16``).

    From config.json's quantization_config when there is one, else `dtype`
    (a safetensors dtype such as the one `weights_dtype` returns).
    """
    q = (config or {}).get("quantization_config")
    if isinstance(q, Mapping):
        method = q.get("quant_method") or q.get("quantization_method")
        if isinstance(method, str) and method:
            label = method.upper()
            bits = quant_bits(config)
            if bits and label != "FP8" and not label.endswith(f"{bits}"):
                label += f"-INT{bits}"
            return label
    if dtype:
        return dtype.upper()
    return None


def chat_template(model_dir: StrPath) -> str | None:
    """The Jinja chat template: chat_template.jinja (newer transformers), chat_template.json, or tokenizer_config.json.

    A named-template list picks the one called "default", else the first.
    """
    d = Path(model_dir)
    try:
        text = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if text.strip():
            return text
    except (OSError, UnicodeDecodeError):
        pass
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = read_json(d / name)
        if data is None:
            continue
        t = data.get("chat_template")
        if isinstance(t, str) and t:
            return t
        if isinstance(t, list):
            named = {e.get("name"): e.get("template") for e in t if isinstance(e, Mapping)}
            pick = named.get("default") or next((v for v in named.values() if isinstance(v, str)), None)
            if isinstance(pick, str):
                return pick
    return None


def size_on_disk(model_dir: StrPath) -> int | None:
    """Bytes of every file under `model_dir`, following symlinks (the HF cache links snapshots to blobs).

    Each file counted once, however many links point at it.
    """
    d = Path(model_dir)
    if not d.is_dir():
        return None
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(d, followlinks=True):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_size
    return total
