"""Real-GPU check of the inventory and the planner (run by hand on a machine with an NVIDIA GPU).

What it proves, on real hardware and a real driver, that the unit tests can
only show against fakes:

1. NVML inventory works (index, UUID, name, total/reserved/used/free).
2. For every visible GPU, a child started with ``CUDA_VISIBLE_DEVICES=<index>``
   and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` allocates on the GPU that NVML calls
   <index>: the numbering the planner hands to vLLM is the right one.
3. A second process holding ``--gib`` GiB (torch) shows up: in the GPU's used
   memory, and in the process list under its PID (not in every container).
4. The planner counts that memory as foreign: a model whose budget fitted
   before the allocation is refused after it, with the numbers, and a small
   one still fits. Counted as ours (its PID in our_pids), the big one fits.
5. `process_tree_vram` measures the child through its parent's PID.

Needs torch with CUDA in the interpreter that runs it (the child uses torch;
the router itself does not). Writes everything it saw as JSON to ``--out``.
Exit status: 0 all checks passed, 1 a check failed, 77 no GPU (skipped).

    python tests/gpu/check_nvml.py --gib 10 --out tests/gpu/evidence/check_nvml.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from router.config import parse
from router.gpu import GiB, HostMemory, NvmlInventory, detect, process_tree_vram, process_tree_vram_by_gpu
from router.placement import format_plan, plan, supports_kv_cache_memory_bytes

# The child: allocate and touch N GiB on cuda:0 of what it can see, say so, hold it until stdin closes.
HOLDER = r"""
import sys, torch
n = int(float(sys.argv[1]) * (1 << 30))
x = torch.empty(n, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("ready", torch.cuda.get_device_name(0), flush=True)
sys.stdin.read()
"""


class Holder:
    """A child process (through a shell, so the torch process is a grandchild: a process tree, like vLLM's)."""

    def __init__(self, gib: float, env: dict[str, str]) -> None:
        cmd = f"{sys.executable} -c '{HOLDER}' {gib}"
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("ready"):
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"memory holder failed: {line!r} {err[-2000:]}")
        self.device_name = line.split(" ", 1)[1].strip()

    def pids(self) -> set[int]:
        import psutil

        p = psutil.Process(self.proc.pid)
        return {p.pid, *(c.pid for c in p.children(recursive=True))}

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=10.0, help="memory the second process holds (GiB)")
    ap.add_argument("--gpu", type=int, default=None, help="NVML index to test on (default: first visible)")
    ap.add_argument("--out", default=str(ROOT / "tests/gpu/evidence/check_nvml.json"))
    a = ap.parse_args()

    report: dict[str, Any] = {"host": platform.node(), "python": sys.version.split()[0], "checks": []}
    failed = False

    def check(name: str, ok: bool, detail: Any = None, *, required: bool = True) -> None:
        nonlocal failed
        failed |= required and not ok
        report["checks"].append({"check": name, "ok": ok, "required": required, "detail": detail})
        status = "PASS" if ok else ("FAIL" if required else "NOTE")
        print(f"[{status}] {name}" + (f": {detail}" if detail is not None else ""), flush=True)

    def save() -> None:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {out}")

    inv = detect("auto")
    if isinstance(inv, HostMemory):
        report["skipped"] = inv.reason
        print(f"SKIP: {inv.reason}")
        save()
        return 77
    assert isinstance(inv, NvmlInventory)
    try:
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda"] = torch.version.cuda
    except ImportError:
        report["skipped"] = "torch is not installed (the memory-holding child needs it)"
        print("SKIP: " + report["skipped"])
        save()
        return 77
    report["vllm_has_kv_cache_memory_bytes"] = supports_kv_cache_memory_bytes()

    # 1. Inventory.
    gpus = inv.gpus()
    report["inventory"] = [asdict(g) for g in gpus]
    report["processes_before"] = [asdict(p) for p in inv.processes()]
    report["unusable"] = inv.unusable  # e.g. GPUs in MIG mode, left out of the plan
    for i, why in sorted(inv.unusable.items()):
        print(f"GPU {i} left out: {why}")
    for g in gpus:
        print(
            f"GPU {g.index} {g.name} {g.uuid} bus {g.pci_bus_id}: total {g.total / GiB:.2f} GiB, "
            f"reserved {g.reserved / GiB:.2f}, used {g.used / GiB:.2f}, free {g.free / GiB:.2f}"
        )
    check("inventory lists GPUs", bool(gpus), len(gpus))
    check(
        "total = reserved + used + free",
        all(abs(g.total - g.reserved - g.used - g.free) <= 64 << 20 for g in gpus),
        [(g.index, g.total - g.reserved - g.used - g.free) for g in gpus],
    )

    # 2. CUDA_VISIBLE_DEVICES=<NVML index> with PCI_BUS_ID order lands on that GPU.
    mapping = []
    for g in gpus:
        h = Holder(1.0, {"CUDA_VISIBLE_DEVICES": str(g.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        try:
            time.sleep(0.5)
            where = process_tree_vram_by_gpu([h.proc.pid], inv)
            after = {x.index: x.used for x in inv.gpus()}
            mapping.append({"index": g.index, "seen_by_pid": where, "used_delta_gib": (after[g.index] - g.used) / GiB})
            if where:
                ok = set(where) == {g.index}
            else:  # PIDs not visible (container): fall back to where the memory appeared
                ok = after[g.index] - g.used >= 0.9 * GiB
            check(f"CUDA_VISIBLE_DEVICES={g.index} (PCI_BUS_ID) allocates on NVML GPU {g.index}", ok, mapping[-1])
        finally:
            h.close()
    report["cuda_index_mapping"] = mapping

    # 3-5. Foreign memory, the planner's view of it, and measuring by process tree.
    target = next((g for g in gpus if g.index == a.gpu), gpus[0]) if a.gpu is not None else gpus[0]
    before = next(g for g in inv.gpus() if g.index == target.index)
    if before.free < (a.gib + 2) * GiB:
        check("enough free memory for the test", False, f"{before.free / GiB:.1f} GiB free on GPU {target.index}")
        save()
        return 1
    # A budget that fits now and will not once the holder has its memory.
    fits_now_gb = round((before.free - a.gib * GiB / 2) / GiB, 1)
    registry = parse(
        {
            "models": [
                {"name": "big", "source": "org/big", "vram_gb": fits_now_gb, "gpus": [target.index]},
                {"name": "small", "source": "org/small", "vram_gb": 1.0, "gpus": [target.index]},
            ]
        }
    )
    p0 = plan(registry.models[:1], inv)
    report["plan_before"] = format_plan(p0)
    check(f"before: a {fits_now_gb} GiB budget fits on GPU {target.index}", p0.fits("big:latest"), p0.problems)

    holder = Holder(a.gib, {"CUDA_VISIBLE_DEVICES": str(target.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    try:
        time.sleep(1.0)
        pids = holder.pids()
        report["holder"] = {"pids": sorted(pids), "device": holder.device_name}
        procs = inv.processes()
        report["processes_during"] = [asdict(p) for p in procs]
        during = next(g for g in inv.gpus() if g.index == target.index)
        delta = during.used - before.used
        report["used_delta_gib"] = delta / GiB
        check(f"used memory grew by ≥ {a.gib} GiB", delta >= a.gib * GiB * 0.99, f"{delta / GiB:.2f} GiB")
        seen = [p for p in procs if p.pid in pids]
        report["pid_visible"] = bool(seen)
        check(
            "the holder's PID is in NVML's process list (not expected in PID-namespaced containers)",
            bool(seen),
            [asdict(p) for p in seen],
            required=False,
        )
        measured = process_tree_vram([holder.proc.pid], inv)
        report["process_tree_vram_gib"] = None if measured is None else measured / GiB
        if seen:
            check(
                "process_tree_vram finds the grandchild through the parent's PID",
                measured is not None and measured >= a.gib * GiB,
                report["process_tree_vram_gib"],
            )

        p1 = plan(registry.models, inv)
        report["plan_during"] = format_plan(p1)
        print(report["plan_during"])
        check("during: the big model is refused (foreign memory counted)", not p1.fits("big:latest"), p1.refused.get("big:latest"))
        check(
            "the refusal names the memory used by other processes",
            any("used by other processes" in m for m in p1.refused.get("big:latest", [])),
        )
        check("during: the small model still fits", p1.fits("small:latest"), p1.placements.get("small:latest"))
        row = next(r for r in p1.devices if r.index == target.index)
        check("the plan's foreign memory includes the holder", row.foreign >= a.gib * GiB * 0.99, f"{row.foreign / GiB:.2f} GiB")
        if seen:
            p2 = plan(registry.models[:1], inv, our_pids=pids)
            report["plan_ours"] = format_plan(p2)
            check("counted as ours (our_pids), the holder's memory is not foreign", p2.fits("big:latest"), p2.problems)
    finally:
        holder.close()

    after = next(g for g in inv.gpus() if g.index == target.index)
    report["used_after_gib"] = after.used / GiB
    check("memory is given back when the holder exits", after.used - before.used < GiB / 2, f"{(after.used - before.used) / GiB:.2f} GiB")
    inv.close()
    report["ok"] = not failed
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
