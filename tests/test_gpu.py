"""GPU inventory: CUDA_VISIBLE_DEVICES, NVML through a fake pynvml, CPU-mode fallback, process trees."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pynvml
import pytest

from router.config import parse
from router.gpu import (
    CANNOT_OPEN,
    MIG_UNSUPPORTED,
    FakeInventory,
    GiB,
    GpuUnavailable,
    HostMemory,
    Inventory,
    NoGpu,
    NvmlInventory,
    decide,
    detect,
    format_cpu_list,
    host_cores,
    parse_cpu_list,
    process_tree,
    process_tree_rss,
    process_tree_vram,
    process_tree_vram_by_gpu,
    visible_indices,
)
from router.placement import plan

UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-bbbb3333-0000", "GPU-cccc4444-0000"]


# --- CUDA_VISIBLE_DEVICES ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("-1", []),
        ("2", [2]),
        ("3,1", [1, 3]),  # listed order does not matter: indices are PCI order
        ("1, 2", [1, 2]),
        ("0,7,1", [0]),  # CUDA stops at the first entry naming no device
        ("1,1", [1]),
        ("GPU-cccc4444-0000", [3]),
        ("GPU-aaaa", [0]),  # unique prefix
        ("cccc4444", [3]),  # "GPU-" may be left out
        ("GPU-bbbb,0", []),  # ambiguous prefix stops the list like an invalid entry
        ("0,MIG-1234", [0]),  # MIG not supported
        ("GPU-cccc4444-0000,0", [0, 3]),
    ],
)
def test_visible_indices(value: str | None, expected: list[int]) -> None:
    assert visible_indices(value, UUIDS) == expected


# --- a fake pynvml ---------------------------------------------------------------


class _Mem:
    def __init__(self, **kw: int) -> None:
        self.__dict__.update(kw)


class _Proc:
    def __init__(self, pid: int, mem: int | None) -> None:
        self.pid = pid
        self.usedGpuMemory = mem


def fake_nvml(
    sizes_gib: list[float],
    *,
    init_error: int | None = None,
    v2: bool = True,
    compute: dict[int, list[tuple[int, float | None]]] | None = None,
    graphics: dict[int, list[tuple[int, float | None]]] | None = None,
    process_error: bool = False,
    mig: frozenset[int] = frozenset(),
    memory_error: int | None = None,
    handle_error: dict[int, int] | None = None,
) -> types.SimpleNamespace:
    """A module with the slice of pynvml's API NvmlInventory uses; errors are pynvml's own classes.

    `init_error` is the module's attribute, read at each nvmlInit: set it later to break the
    driver under a running server. `handle_error`: NVML index → error of nvmlDeviceGetHandleByIndex.
    """
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if module.init_error is not None:
            raise pynvml.NVMLError(module.init_error)

    def handle(i: int) -> int:
        if i in (handle_error or {}):
            raise pynvml.NVMLError((handle_error or {})[i])
        return i

    def memory(h: int, version: int | None = None) -> _Mem:
        if memory_error is not None:
            raise pynvml.NVMLError(memory_error)
        total = int(sizes_gib[h] * GiB)
        used = sum(int((g or 0) * GiB) for _, g in (compute or {}).get(h, []))
        if version is not None:
            if not v2:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            reserved = GiB // 2
            return _Mem(total=total, reserved=reserved, used=used, free=total - reserved - used)
        return _Mem(total=total, used=used + GiB // 2, free=total - used - GiB // 2)

    def procs(table: dict[int, list[tuple[int, float | None]]] | None):
        def get(h: int) -> list[_Proc]:
            if process_error:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return [_Proc(pid, None if g is None else int(g * GiB)) for pid, g in (table or {}).get(h, [])]

        return get

    def mig_mode(h: int) -> list[int]:
        if sizes_gib[h] < 40:  # like a GPU without MIG support
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        on = pynvml.NVML_DEVICE_MIG_ENABLE if h in mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [on, on]

    module = types.SimpleNamespace(
        calls=calls,
        init_error=init_error,
        NVMLError=pynvml.NVMLError,
        nvmlMemory_v2=pynvml.nvmlMemory_v2,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(sizes_gib),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetUUID=lambda h: UUIDS[h],
        nvmlDeviceGetName=lambda h: f"NVIDIA Fake {sizes_gib[h]:g}GB".encode(),  # old pynvml returns bytes
        nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(busId=f"00000000:{h + 1:02X}:00.0"),
        nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetComputeRunningProcesses=procs(compute),
        nvmlDeviceGetGraphicsRunningProcesses=procs(graphics),
        nvmlDeviceGetMigMode=mig_mode,
        NVML_DEVICE_MIG_ENABLE=pynvml.NVML_DEVICE_MIG_ENABLE,
    )
    return module


def test_nvml_inventory_reads_memory_v2_and_processes() -> None:
    nvml = fake_nvml(
        [80, 24],
        compute={0: [(100, 10.0), (200, None)], 1: [(300, 2.0)]},
        graphics={0: [(100, 10.0), (400, 1.0)]},  # pid 100 in both lists: counted once
    )
    inv = NvmlInventory(nvml, environ={})
    assert isinstance(inv, Inventory)
    g0, g1 = inv.gpus()
    assert (g0.index, g0.uuid, g0.name, g0.pci_bus_id) == (0, UUIDS[0], "NVIDIA Fake 80GB", "00000000:01:00.0")
    assert g0.total == 80 * GiB and g0.reserved == GiB // 2 and g0.used == 10 * GiB
    assert g0.free == g0.total - g0.reserved - g0.used
    assert g1.used == 2 * GiB
    procs = {(p.pid, p.gpu_index): p.used_bytes for p in inv.processes()}
    assert procs == {(100, 0): 10 * GiB, (200, 0): None, (400, 0): GiB, (300, 1): 2 * GiB}
    inv.close()
    inv.close()
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_memory_falls_back_to_v1() -> None:
    inv = NvmlInventory(fake_nvml([16], v2=False), environ={})
    (g,) = inv.gpus()
    assert g.reserved == 0 and g.used == GiB // 2 and g.free == 16 * GiB - GiB // 2


def test_nvml_process_listing_not_supported_is_empty_not_fatal() -> None:
    inv = NvmlInventory(fake_nvml([16], process_error=True), environ={})
    assert inv.processes() == []
    assert len(inv.gpus()) == 1


def test_nvml_respects_cuda_visible_devices() -> None:
    nvml = fake_nvml([24, 48, 48, 80], compute={0: [(1, 1.0)], 3: [(2, 3.0)]})
    inv = NvmlInventory(nvml, environ={"CUDA_VISIBLE_DEVICES": "GPU-cccc,1"})
    assert [g.index for g in inv.gpus()] == [1, 3]  # NVML indices, as nvidia-smi shows them
    assert [(p.pid, p.gpu_index) for p in inv.processes()] == [(2, 3)]


def test_mig_gpu_is_left_out_not_taken_for_a_whole_gpu() -> None:
    """NVML gives a MIG-mode GPU's whole memory, but a vLLM there would get one instance's share."""
    nvml = fake_nvml([80, 80, 24], mig=frozenset({1}))
    inv = NvmlInventory(nvml, environ={})
    assert [g.index for g in inv.gpus()] == [0, 2]  # GPU 2 (24 GiB) has no MIG: "Not Supported" means no
    assert inv.unusable == {1: MIG_UNSUPPORTED}
    inv.close()
    only_mig = detect("auto", nvml=fake_nvml([80], mig=frozenset({0})), environ={})
    assert isinstance(only_mig, HostMemory) and "GPU 0: MIG mode is on" in only_mig.reason
    with pytest.raises(GpuUnavailable, match="MIG mode is on"):
        detect("gpu", nvml=fake_nvml([80], mig=frozenset({0})), environ={})


def test_a_gpu_nvml_cannot_open_is_left_out_named_and_the_others_used() -> None:
    """nvmlDeviceGetHandleByIndex refusing one GPU (lost, no permission) must not take the others with it."""
    nvml = fake_nvml([80, 80, 24, 48], handle_error={1: pynvml.NVML_ERROR_GPU_IS_LOST})
    inv = NvmlInventory(nvml, environ={})
    assert [g.index for g in inv.gpus()] == [0, 2, 3]
    assert inv.unusable == {1: f"{CANNOT_OPEN}: GPU is lost"}
    ms = parse({"models": [{"name": "a", "source": "org/a", "vram_gb": 4, "gpus": [1]},
                           {"name": "b", "source": "org/b", "vram_gb": 4}]}).models
    p = plan(ms, inv)
    assert p.refused["a:latest"] == [f"a:latest: GPU 1 is not available: {CANNOT_OPEN}: GPU is lost (visible GPUs: 0, 2, 3)"]
    assert p.placements["b:latest"].gpus == [2] and f"GPU 1 is not used: {CANNOT_OPEN}: GPU is lost" in p.warnings
    inv.close()
    assert nvml.calls == ["init", "shutdown"]
    # The others keep their NVML indices and UUIDs: CUDA_VISIBLE_DEVICES still finds them.
    nvml = fake_nvml([24, 48, 48, 80], handle_error={1: pynvml.NVML_ERROR_NO_PERMISSION})
    inv = NvmlInventory(nvml, environ={"CUDA_VISIBLE_DEVICES": "GPU-cccc,1"})
    assert [g.index for g in inv.gpus()] == [3] and inv.unusable == {1: f"{CANNOT_OPEN}: Insufficient Permissions"}
    inv.close()


def test_detect_keeps_gpu_mode_when_its_only_gpu_cannot_be_opened() -> None:
    """A lost GPU is still a GPU: CPU mode would run vLLM beside it unconfined. The plan refuses, in NVML's words."""
    for device in ("auto", "gpu"):
        inv = detect(device, nvml=fake_nvml([80], handle_error={0: pynvml.NVML_ERROR_GPU_IS_LOST}), environ={})
        assert isinstance(inv, NvmlInventory) and inv.gpus() == []
        p = plan(parse({"models": [{"name": "a", "source": "org/a", "vram_gb": 4}]}).models, inv)
        assert p.mode == "gpu"
        assert p.refused["a:latest"] == ["a:latest: no GPU is visible (GPU 0: NVML cannot open it: GPU is lost)"]
        inv.close()


def test_nvml_read_error_is_a_clear_error_not_a_traceback() -> None:
    """NVML starts, then a GPU cannot be read (fell off the bus): say so, in NVML's words."""
    nvml = fake_nvml([80], memory_error=pynvml.NVML_ERROR_GPU_IS_LOST)
    inv = NvmlInventory(nvml, environ={})
    with pytest.raises(GpuUnavailable, match=r"NVML cannot read the memory of GPU 0 \(NVIDIA Fake 80GB\): GPU is lost"):
        inv.gpus()
    inv.close()
    # Still GPU mode (CPU mode would start vLLM on the GPUs unconfined): the planner refuses, with the words.
    for device in ("auto", "gpu"):
        inv = detect(device, nvml=fake_nvml([80], memory_error=pynvml.NVML_ERROR_GPU_IS_LOST), environ={})
        assert isinstance(inv, NvmlInventory)
        p = plan(parse({"models": [{"name": "a", "source": "org/a", "vram_gb": 4}]}).models, inv)
        assert p.mode == "gpu" and p.refused["a:latest"] == [
            "a:latest: no GPU is visible (NVML cannot read the memory of GPU 0 (NVIDIA Fake 80GB): GPU is lost)"
        ]
        inv.close()


def test_driver_library_mismatch_is_not_called_no_driver() -> None:
    """After a driver upgrade without a reboot the driver is there; "no NVIDIA driver" would mislead."""
    nvml = fake_nvml([80], init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    with pytest.raises(GpuUnavailable) as e:
        detect("gpu", nvml=nvml)
    assert "no NVIDIA driver" not in str(e.value)
    assert "driver present but unusable" in str(e.value) and "version mismatch" in str(e.value)


# --- detection and CPU mode ----------------------------------------------------


def test_detect_without_driver_is_cpu_mode_with_a_reason() -> None:
    nvml = fake_nvml([80], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    inv = detect("auto", nvml=nvml)
    assert isinstance(inv, HostMemory)
    assert "CPU mode" in inv.reason and "NVML Shared Library Not Found" in inv.reason
    assert inv.total > 0 and 0 <= inv.available <= inv.total


def test_detect_gpu_without_driver_raises_clearly() -> None:
    nvml = fake_nvml([80], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(GpuUnavailable, match="engine.device is gpu but no NVIDIA driver.*Driver Not Loaded"):
        detect("gpu", nvml=nvml)


def test_detect_cpu_never_touches_nvml() -> None:
    nvml = fake_nvml([80])
    inv = detect("cpu", nvml=nvml)
    assert isinstance(inv, HostMemory) and nvml.calls == []


def test_detect_auto_with_gpus_is_gpu_mode() -> None:
    inv = detect("auto", nvml=fake_nvml([80, 80]), environ={})
    assert isinstance(inv, NvmlInventory) and len(inv.gpus()) == 2
    inv.close()


def test_detect_all_gpus_hidden_is_cpu_mode() -> None:
    nvml = fake_nvml([80, 80])
    inv = detect("auto", nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": ""})
    assert isinstance(inv, HostMemory) and "hides all 2 GPUs" in inv.reason
    assert nvml.calls == ["init", "shutdown"]
    with pytest.raises(GpuUnavailable):
        detect("gpu", nvml=fake_nvml([80]), environ={"CUDA_VISIBLE_DEVICES": "-1"})


def test_auto_is_decided_once_and_nvml_failing_later_refuses_instead_of_cpu_mode() -> None:
    """A driver upgraded under a running server: NVML stops starting, but the box still has its GPUs."""
    nvml = fake_nvml([80])
    mode, inv = decide("auto", nvml=nvml, environ={})
    assert mode.gpu and isinstance(inv, NvmlInventory)
    inv.close()
    nvml.init_error = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    assert isinstance(detect("auto", nvml=nvml, environ={}), HostMemory)  # resolved anew, it would be CPU mode
    later = mode.read(nvml=nvml, environ={})
    assert isinstance(later, NoGpu)
    p = plan(parse({"models": [{"name": "a", "source": "org/a", "vram_gb": 4}]}).models, later)
    why = ("engine.device auto chose GPU mode, which it keeps, but now NVML failed to start "
           "(NVIDIA driver present but unusable): RM has detected an NVML/RM version mismatch.")
    assert p.mode == "gpu" and p.refused["a:latest"] == [f"a:latest: no GPU is visible ({why})"]
    nvml.init_error = None  # once NVML works again, the GPUs are back
    again = mode.read(nvml=nvml, environ={})
    assert isinstance(again, NvmlInventory) and len(again.gpus()) == 1
    again.close()


def test_cpu_mode_once_decided_stays_and_reads_no_nvml() -> None:
    nvml = fake_nvml([80], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    mode, inv = decide("auto", nvml=nvml, environ={})
    assert not mode.gpu and isinstance(inv, HostMemory) and "NVML Shared Library Not Found" in mode.reason
    nvml.init_error = None
    later = mode.read(nvml=nvml, environ={})
    assert isinstance(later, HostMemory) and later.reason == inv.reason and nvml.calls == ["init"]


def test_decide_gpu_without_nvml_is_gpu_mode_refusing_with_the_reason() -> None:
    """``device: gpu`` in a server: models refused in clear words, not a traceback out of the planner's caller."""
    mode, inv = decide("gpu", nvml=fake_nvml([80], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED), environ={})
    assert mode.gpu and isinstance(inv, NoGpu) and isinstance(inv, Inventory)
    with pytest.raises(GpuUnavailable, match="engine.device is gpu but no NVIDIA driver.*Driver Not Loaded"):
        inv.gpus()
    assert inv.processes() == []


def test_detect_rejects_unknown_device() -> None:
    with pytest.raises(ValueError):
        detect("tpu")


def test_detect_on_this_machine_does_not_crash() -> None:
    """Real pynvml: a GPU box gives NVML, this CPU-only one gives CPU mode with a reason."""
    inv = detect("auto")
    if isinstance(inv, HostMemory):
        assert inv.reason.startswith("CPU mode:")
    else:
        assert inv.gpus()
        inv.close()


def test_host_memory_read_and_fake_rss() -> None:
    live = HostMemory.read("why")
    assert live.total > 0 and 0 < live.available <= live.total and live.reason == "why"
    assert live.used_by([os.getpid()]) > 0
    fake = HostMemory(24 * GiB, 20 * GiB, process_rss={1: GiB, 2: 2 * GiB})
    assert fake.used_by([1, 2, 3]) == 3 * GiB


# --- fake inventory and measuring ------------------------------------------------


def test_fake_inventory_accounts_processes_and_unattributed_memory() -> None:
    inv = FakeInventory([80, 24], processes=[(10, 0, 30.0), (11, 1, None)], reserved_gib=0.5, unattributed_gib={1: 2})
    g0, g1 = inv.gpus()
    assert g0.used == 30 * GiB and g0.free == int(49.5 * GiB)
    assert g1.used == 2 * GiB
    inv.add_process(12, 1, 4)
    assert inv.gpus()[1].used == 6 * GiB
    inv.remove_process(12)
    assert inv.gpus()[1].used == 2 * GiB
    with pytest.raises(ValueError):
        inv.add_process(1, 5, 1)


def test_process_tree_vram_counts_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        assert {me, child.pid} <= process_tree([me])
        inv = FakeInventory([80, 80], processes=[(me, 0, 1.0), (child.pid, 0, 2.0), (child.pid, 1, 3.0), (1, 0, 9.0)])
        assert process_tree_vram_by_gpu([me], inv) == {0: 3 * GiB, 1: 3 * GiB}
        assert process_tree_vram([me], inv) == 6 * GiB
        assert process_tree_vram([2**22 + 12345], inv) is None  # no such process
        assert process_tree_rss([me]) >= process_tree_rss([me], children=False) > 0
    finally:
        child.kill()
        child.wait()


def test_host_cores_one_thread_per_physical_core(tmp_path: Path) -> None:
    """8 logical CPUs, hyper-threads numbered i and i + 4 (as Linux numbers them on x86)."""
    for cpu in range(8):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        topo.joinpath("thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    assert host_cores(range(8), sysfs=tmp_path) == (0, 1, 2, 3)
    assert host_cores({5, 6, 7}, sysfs=tmp_path) == (5, 6, 7)  # a cpuset with one thread of each core
    assert host_cores({2, 9}, sysfs=tmp_path) == (2, 9)  # no topology for 9: a core of its own
    live = host_cores()  # this host: at least one core, only CPUs this process may use
    assert live and set(live) <= os.sched_getaffinity(0) and HostMemory.read().cores == live


def test_cpu_list_format_round_trip() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpu_list([]) == ""
