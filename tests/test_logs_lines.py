"""`vllama logs -n N` and ``GET /vllama/models/{name}/logs?lines=N``: 0 is nothing, as ``tail -n 0``.

`logs -f -n 0` follows only what is logged from now on; the whole log (``text[-0:]``) would
bury it. A negative count is a mistake, said as such rather than read as "everything".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from litestar.testing import TestClient

from router import cli
from router.admin import admin_router
from router.app import create_app
from router.catalog import Catalog
from router.config import parse
from router.lifecycle import Fleet
from router.service import OllamaService
from router.supervisor import Paths, tail_file

LOG = [f"line {i}" for i in range(185)]


class Sup:
    """supervisord as the logs endpoint sees it: where the logs are."""

    def __init__(self, root: Path) -> None:
        self.paths = Paths(root)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "vllm.log"
    path.write_text("\n".join(LOG) + "\n")
    return path


def test_tail_file_of_zero_lines_is_nothing_as_tail_n_0(log_file: Path) -> None:
    assert tail_file(log_file, 0) == []
    assert tail_file(log_file, -5) == []
    assert tail_file(log_file, 3) == LOG[-3:]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    config = parse({"engine": {"device": "cpu"}, "models": [{"name": "tiny", "source": str(model_dir)}]},
                   path=tmp_path / "models.yaml")
    sup = Sup(tmp_path / "run")
    fleet = Fleet(config, sup, None)  # type: ignore[arg-type]
    fleet.runtimes = {m.name: fleet._runtime_for(m) for m in config.models}  # as `start` makes them
    log = sup.paths.log(fleet.get("tiny").program)
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(LOG) + "\n")
    app = create_app(OllamaService(fleet, None), Catalog(config), extra_routes=[admin_router(fleet)])  # type: ignore[arg-type]
    with TestClient(app) as c:
        yield c


def test_logs_endpoint_with_lines_0_sends_nothing(client: TestClient[Any]) -> None:
    r = client.get("/vllama/models/tiny/logs", params={"lines": 0})
    assert r.status_code == 200 and r.text == ""
    r = client.get("/vllama/models/tiny/logs", params={"lines": 2})
    assert r.text == "line 183\nline 184\n"


def test_logs_endpoint_refuses_a_negative_count(client: TestClient[Any]) -> None:
    r = client.get("/vllama/models/tiny/logs", params={"lines": -5})
    assert r.status_code == 400
    assert "lines must be 0 or more" in r.json()["error"]


def test_cli_logs_refuses_a_negative_count_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLAMA_HOST", "127.0.0.1:1")  # never reached: refused before any request
    result = CliRunner().invoke(cli.cli, ["logs", "tiny", "-n", "-5"])
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err == "error: --lines must be 0 or more, not -5", err
