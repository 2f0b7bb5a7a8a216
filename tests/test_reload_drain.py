"""A reload that removes a model lets its requests finish before supervisord stops it.

The Fleet runs against a recording stand-in for supervisord: what matters is the order
of the program sets it is given and of the stops, which a real supervisord makes slow
and racy to observe (tests/e2e/test_reload.py checks the same on real vLLM).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from router.config import parse
from router.lifecycle import Fleet, State


class RecordingSupervisor:
    def __init__(self) -> None:
        self.applied: list[set[str]] = []
        self.stopped: list[str] = []

    async def apply(self, programs: Any) -> tuple[list[str], list[str], list[str]]:
        self.applied.append({p.name for p in programs})
        await asyncio.sleep(0)
        return [], [], []

    async def stop(self, name: str) -> None:
        self.stopped.append(name)


def registry(*names: str) -> Any:
    return parse({"models": [{"name": n, "source": f"/models/{n}"} for n in names]}, path=Path("/x/models.yaml"))


async def test_removed_model_keeps_its_program_until_its_requests_finish() -> None:
    sup = RecordingSupervisor()
    fleet = Fleet(registry("a", "b"), sup, upstream=None)  # type: ignore[arg-type]
    for m in fleet.config.models:
        rt = fleet.runtimes[m.name] = fleet._runtime_for(m)
        rt.state = State.READY
    b = fleet.runtimes["b:latest"]
    b.inflight = 1  # a stream in progress

    await fleet.reload(registry("a"))
    assert "b:latest" not in fleet.runtimes  # new requests no longer reach it
    assert all(b.program in programs for programs in sup.applied)  # but supervisord keeps it running
    await asyncio.sleep(0.3)
    assert sup.stopped == []  # drained, not cut

    b.inflight = 0
    for _ in range(50):
        if sup.stopped:
            break
        await asyncio.sleep(0.1)
    assert sup.stopped == [b.program]
    assert b.program not in sup.applied[-1]  # then its program is dropped
    await fleet.close()
