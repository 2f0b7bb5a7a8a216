"""Human-readable sizes, shared by messages, logs and the CLI.

A module of its own so that `vllama ps` and `vllama list` print sizes without importing
`hub`, whose huggingface_hub import costs a few hundred milliseconds per command.
"""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: float) -> str:
    """``1.5 GiB``, ``3.2 MiB``, ``512 B``: binary units, one decimal above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
