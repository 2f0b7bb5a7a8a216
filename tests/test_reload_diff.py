"""What a reload restarts, and what it applies in place."""

from __future__ import annotations

from pathlib import Path

from router.config import parse
from router.lifecycle import diff


def reg(*models: dict, engine: dict | None = None):
    return parse({"models": list(models), **({"engine": engine} if engine else {})}, path=Path("/x/models.yaml"))


A = {"name": "a", "source": "org/a"}
B = {"name": "b", "source": "org/b", "max_model_len": 1024}


def test_added_removed_and_untouched() -> None:
    d = diff(reg(A, B), reg(B, {"name": "c", "source": "org/c"}))
    assert d["added"] == ["c:latest"] and d["removed"] == ["a:latest"] and d["unchanged"] == ["b:latest"]
    assert d["changed"] == [] and d["updated"] == []


def test_launch_settings_restart_but_router_settings_apply_in_place() -> None:
    d = diff(reg(A, B), reg({**A, "aliases": ["x"], "keep_alive": "1h", "load": "on_demand"},
                            {**B, "max_model_len": 2048}))
    assert d["changed"] == ["b:latest"]
    assert d["updated"] == ["a:latest"]


def test_engine_change_restarts_every_local_model() -> None:
    remote = {"name": "r", "source": "org/r", "url": "http://127.0.0.1:9000"}
    d = diff(reg(A, remote), reg(A, remote, engine={"args": ["--enforce-eager"]}))
    assert d["changed"] == ["a:latest"] and d["unchanged"] == ["r:latest"]


def test_a_moved_local_directory_is_a_change(tmp_path: Path) -> None:
    m = {"name": "m", "source": "./m"}
    old = parse({"models": [m]}, path=tmp_path / "one" / "models.yaml")
    new = parse({"models": [m]}, path=tmp_path / "two" / "models.yaml")
    assert diff(old, new)["changed"] == ["m:latest"]


def test_a_model_whose_change_did_not_start_is_compared_with_what_serves() -> None:
    """The file says B with max_model_len 4096, whose server did not start; B at 1024 serves on."""
    served = reg(A, B)
    failed = reg(A, {**B, "max_model_len": 4096})
    serving = {"b:latest": (served, served.lookup("b:latest"))}
    assert diff(failed, failed)["unchanged"] == ["a:latest", "b:latest"]  # what the fleet said before
    assert diff(failed, failed, serving)["changed"] == ["b:latest"]  # the same file again: try it again
    put_back = diff(failed, reg(A, {**B, "aliases": ["bee"]}), serving)
    assert put_back["changed"] == [] and put_back["updated"] == ["b:latest"]  # back to what serves
