"""What the registry's models are, as Ollama's listing endpoints describe them.

Facts come from the model's own files (a local directory, or its snapshot in
the Hugging Face cache), read by `modelinfo`: size on disk, modification time,
family and the rest from config.json, parameter count and dtype from the
safetensors headers, the chat template, generation_config.json's sampling
defaults. Nothing is invented: what cannot be read is left empty (or 0 where
Ollama's clients need a number). Reading is cached for a few seconds, since
clients such as Open WebUI poll /api/tags.

/api/ps adds what runs: the fleet's runtimes, and memory measured from the
model's process tree (RSS in CPU mode, NVML's per-process VRAM on GPUs).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import modelinfo, wire
from .config import Config, Model, is_local_source

if TYPE_CHECKING:
    from .lifecycle import Fleet, Runtime

log = logging.getLogger("vllama.catalog")

CACHE_SECONDS = 10.0
#: Ollama shows a model kept forever as expiring this far ahead (Go's max duration, ~292 years).
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)

# config.json keys → the GGUF-style model_info keys Ollama's clients read (prefixed by the architecture).
_MODEL_INFO_KEYS = (
    ("max_position_embeddings", "context_length"),
    ("hidden_size", "embedding_length"),
    ("num_hidden_layers", "block_count"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("head_dim", "attention.key_length"),
    ("head_dim", "attention.value_length"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("layer_norm_eps", "attention.layer_norm_epsilon"),
    ("sliding_window", "attention.sliding_window"),
    ("rope_theta", "rope.freq_base"),
    ("vocab_size", "vocab_size"),
    ("num_local_experts", "expert_count"),
    ("n_routed_experts", "expert_count"),
    ("num_experts", "expert_count"),
    ("num_experts_per_tok", "expert_used_count"),
)

# generation_config.json → Ollama's parameter names (the defaults vLLM applies).
_PARAMETERS = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("min_p", "min_p"),
    ("repetition_penalty", "repeat_penalty"),
)


def model_dir(config: Config, model: Model) -> Path | None:
    """Where the model's files are: its local directory, or its snapshot in the HF cache."""
    if model.url is not None and not is_local_source(model.source):
        return None  # served elsewhere; its files need not be here
    if is_local_source(model.source):
        p = Path(config.source_path(model))
        return p if p.is_dir() else None
    try:
        from . import hub  # imports huggingface_hub: only when a model comes from the Hub

        snap = hub.local_snapshot(model.source, model.revision)
    except Exception as e:  # noqa: BLE001 - an unreadable cache means "no files", not a failed request
        log.debug("%s: no local snapshot: %s", model.name, e)
        return None
    return snap.path if snap is not None and snap.path.is_dir() else None


def download_state(config: Config, model: Model) -> str:
    """Whether the model's files are here: what `vllama list` shows beside the size."""
    if model.url is not None:
        return "remote"
    if is_local_source(model.source):
        return "local" if Path(config.source_path(model)).is_dir() else "missing"
    try:
        from . import hub

        snap = hub.local_snapshot(model.source, model.revision)
    except Exception:  # noqa: BLE001 - an unreadable cache is as good as no cache here
        snap = None
    if snap is None:
        return "not downloaded"
    return "downloaded" if snap.complete else "partial"


def context_length(config: Config, model: Model) -> int | None:
    """The context vLLM serves the model with: max_model_len, else config.json's."""
    if model.max_model_len:
        return model.max_model_len
    d = model_dir(config, model)
    return modelinfo.max_context_length(modelinfo.read_config(d)) if d else None


def _digest(files: list[Path], root: Path, commit: str | None) -> str:
    """A sha256 that changes whenever the model does: the HF commit, else the files' names, sizes, mtimes."""
    h = hashlib.sha256()
    if commit:
        h.update(commit.encode())
    else:
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class Facts:
    """What a model's files say, read once per `CACHE_SECONDS`."""

    dir: Path | None = None
    size: int = 0
    modified: datetime | None = None
    digest: str = ""
    config: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    format: str = ""
    family: str = ""
    parameters: int | None = None
    quantization: str = ""
    template: str = ""
    license: str = ""
    read_at: float = field(default_factory=time.monotonic)

    @property
    def details(self) -> wire.ModelDetails:
        return wire.ModelDetails(
            format=self.format, family=self.family, families=[self.family] if self.family else None,
            parameter_size=modelinfo.parameter_size_label(self.parameters) or "",
            quantization_level=self.quantization)


def _read_text(d: Path, names: Iterable[str]) -> str:
    for n in names:
        try:
            return (d / n).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return ""


def read_facts(d: Path | None) -> Facts:
    if d is None or not d.is_dir():
        return Facts()
    files = sorted(p for p in d.rglob("*") if p.is_file())
    mtimes = []
    for f in files:
        try:
            mtimes.append(f.stat().st_mtime)
        except OSError:
            pass
    commit = d.name if d.parent.name == "snapshots" else None
    config = modelinfo.read_config(d)
    weights = modelinfo.read_weights(d)
    fmt = "safetensors" if weights is not None else ("gguf" if any(d.glob("*.gguf")) else "")
    return Facts(
        dir=d,
        size=modelinfo.size_on_disk(d) or 0,
        modified=datetime.fromtimestamp(max(mtimes, default=d.stat().st_mtime)).astimezone(),
        digest=_digest(files, d, commit),
        config=config,
        generation=modelinfo.read_json(d / "generation_config.json"),
        format=fmt,
        family=modelinfo.family(config) or "",
        parameters=modelinfo.parameter_count(d, config),
        quantization=modelinfo.quantization_level(config, weights.dtype if weights else None) or "",
        template=modelinfo.chat_template(d) or "",
        license=_read_text(d, ("LICENSE", "LICENSE.md", "LICENSE.txt")),
    )


def model_info(facts: Facts) -> dict[str, Any]:
    """config.json in the GGUF-style keys Ollama's /api/show returns (``llama.context_length``…)."""
    cfg = facts.config
    if not cfg:
        return {}
    arch = facts.family or "model"
    info: dict[str, Any] = {"general.architecture": arch}
    if facts.parameters is not None:
        info["general.parameter_count"] = facts.parameters
    text = modelinfo.text_config(cfg)
    for src, dst in _MODEL_INFO_KEYS:
        v = text.get(src)
        if isinstance(v, int | float) and not isinstance(v, bool) and f"{arch}.{dst}" not in info:
            info[f"{arch}.{dst}"] = v
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key, text.get(key))
        if isinstance(v, int) and not isinstance(v, bool):
            info[f"tokenizer.ggml.{key}"] = v
    return info


def capabilities(model: Model, facts: Facts) -> list[str]:
    """Ollama's capability names for what vLLama serves this model for."""
    if model.embedding:
        return ["embedding"]
    caps = ["completion"]
    if model.tool_call_parser:
        caps.append("tools")
    if model.reasoning_parser:
        caps.append("thinking")
    cfg = facts.config or {}
    if "vision_config" in cfg or "vision_tower" in cfg:
        caps.append("vision")
    return caps


def _param_value(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def parameters(model: Model, facts: Facts) -> str:
    """Ollama's Modelfile-style parameter lines: the sampling defaults vLLM applies
    (generation_config.json) and the context length the model is served with."""
    lines = []
    if model.max_model_len:
        lines.append(f"{'num_ctx':<30} {model.max_model_len}")
    gen = facts.generation or {}
    for src, dst in _PARAMETERS:
        v = gen.get(src)
        if isinstance(v, int | float) and not isinstance(v, bool):
            lines.append(f"{dst:<30} {_param_value(v)}")
    return "\n".join(lines)


def modelfile(model: Model, facts: Facts, params: str) -> str:
    parts = [f"# Modelfile generated by vLLama from models.yaml (model {model.name})", f"FROM {model.source}"]
    if facts.template:
        parts.append(f'TEMPLATE """{facts.template}"""')
    parts += [f"PARAMETER {line}" for line in params.splitlines()]
    return "\n".join(parts) + "\n"


def tensors(d: Path) -> list[wire.TensorInfo]:
    out = []
    for path in modelinfo.safetensors_files(d):
        header = modelinfo.safetensors_header(path) or {}
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, Mapping):
                continue
            out.append(wire.TensorInfo(name=name, type=str(t.get("dtype", "")),
                                       shape=[int(x) for x in t.get("shape", ())]))
    return out


def _local(ts: datetime) -> str:
    return ts.astimezone().isoformat()


class Catalog:
    def __init__(self, config: Config, fleet: Fleet | None = None) -> None:
        self._config = config
        self.fleet = fleet
        self._cache: dict[tuple[str, str, str | None], Facts] = {}

    def attach(self, fleet: Fleet) -> None:
        """Follow `fleet`'s registry (it changes on reload) and runtimes, for /api/ps."""
        self.fleet = fleet

    @property
    def config(self) -> Config:
        return self.fleet.config if self.fleet is not None else self._config

    def facts(self, model: Model) -> Facts:
        key = (model.name, model.source, model.revision)
        f = self._cache.get(key)
        if f is None or time.monotonic() - f.read_at > CACHE_SECONDS:
            f = self._cache[key] = read_facts(model_dir(self.config, model))
        return f

    def _modified(self, f: Facts) -> datetime:
        if f.modified is not None:
            return f.modified
        path = self.config.path
        try:
            return datetime.fromtimestamp(path.stat().st_mtime).astimezone() if path else datetime.now().astimezone()
        except OSError:
            return datetime.now().astimezone()

    def listed(self, model: Model) -> wire.ListedModel:
        f = self.facts(model)
        return wire.ListedModel(name=model.name, model=model.name, modified_at=_local(self._modified(f)),
                                size=f.size, digest=f.digest, details=f.details,
                                download=download_state(self.config, model))

    def tags(self) -> wire.TagsResponse:
        """Every model of the registry, newest first (as Ollama lists them)."""
        listed = [self.listed(m) for m in self.config.models]
        listed.sort(key=lambda m: m.modified_at, reverse=True)
        return wire.TagsResponse(models=listed)

    def show(self, name: str, verbose: bool = False) -> wire.ShowResponse | None:
        model = self.config.lookup(name)
        if model is None:
            return None
        f = self.facts(model)
        params = parameters(model, f)
        info = model_info(f)
        return wire.ShowResponse(
            details=f.details, model_info=info, capabilities=capabilities(model, f), template=f.template,
            parameters=params, license=f.license, modelfile=modelfile(model, f, params),
            modified_at=_local(self._modified(f)),
            tensors=tensors(f.dir) if verbose and f.dir is not None and f.format == "safetensors" else None)

    def ps(self, measure: bool = True) -> wire.PsResponse:
        """The models that are loaded (ready), with what they hold in memory, measured."""
        from .lifecycle import State

        if self.fleet is None:
            return wire.PsResponse(models=[])
        now = datetime.now().astimezone()
        out = []
        for rt in self.fleet.runtimes.values():
            if rt.state != State.READY:
                continue
            m = rt.model
            f = self.facts(m)
            size, vram = self._memory(rt) if measure else (0, 0)
            out.append(wire.RunningModel(
                name=m.name, model=m.name, size=size, digest=f.digest, details=f.details,
                expires_at=_local(self._expires(rt, now)), size_vram=vram,
                context_length=m.max_model_len or modelinfo.max_context_length(f.config) or 0))
        return wire.PsResponse(models=out)

    @staticmethod
    def _expires(rt: Runtime, now: datetime) -> datetime:
        import math

        if rt.always or rt.keep_alive == math.inf:
            return now + FOREVER
        if rt.expires_at is None:  # in use: the countdown starts when the last request ends
            return now + timedelta(seconds=rt.keep_alive)
        return datetime.fromtimestamp(rt.expires_at, UTC).astimezone()

    def _memory(self, rt: Runtime) -> tuple[int, int]:
        """(size, size_vram) in bytes, measured from the model's process tree; 0 when not measurable.

        The fleet's measure when it has one (what `vllama ps` shows: VRAM on GPUs, the
        tree's memory in CPU mode), else NVML's VRAM or the tree's RSS. size_vram is 0 in
        CPU mode.
        """
        if not rt.pid:
            return 0, 0
        memory = getattr(self.fleet, "memory", None)  # the fleet's own measure, as `vllama ps` shows it
        if memory is not None:
            try:
                measured, _budget, devices = memory(rt)
            except Exception:  # noqa: BLE001 - fall back to measuring here
                measured, devices = None, []
            if measured:
                return measured, measured if any(d.startswith("gpu") for d in devices) else 0
        try:
            from . import gpu
        except ImportError:
            return 0, 0
        vram = None
        if self.config.engine.device != "cpu":
            try:
                vram = gpu.process_tree_vram([rt.pid])
            except Exception:  # noqa: BLE001 - NVML trouble: report what can be measured
                vram = None
        if vram:
            return vram, vram
        try:
            return gpu.process_tree_rss([rt.pid]), 0
        except Exception:  # noqa: BLE001
            return 0, 0
