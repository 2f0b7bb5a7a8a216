"""Shared fixtures: the tiny models (written once per machine) and free ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Tiny models are cached here between runs (and by the README's setup command).
MODELS = Path(os.environ.get("VLLAMA_TEST_MODELS", REPO / "models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The default tiny Llama (seed 0), the one configs/models.yaml serves."""
    from router.devtools import write_tiny_model

    return write_tiny_model(MODELS / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b() -> Path:
    """A second tiny Llama with other weights (seed 1): answers differ from `tiny_model`'s."""
    from router.devtools import write_tiny_model

    return write_tiny_model(MODELS / "tiny-b", seed=1)
