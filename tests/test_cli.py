"""The `vllama` command line as a user runs it: one-line errors and exit codes, never a traceback.

Most tests talk to an `httpx.MockTransport` standing in for the server, so
that a test can make it fail in ways a real router rarely does (a body cut mid-stream, a
timeout, an error body that is not Ollama's); a few run against the real router on a thread
(tests/served.py) with a FakeVLLM behind it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from router import cli

try:  # tests/ is not a package today; keep working if it becomes one
    from .fake_vllm import FakeVLLM
    from .fakehub import FakeHub
    from .served import ServedRouter
except ImportError:
    from fake_vllm import FakeVLLM
    from fakehub import FakeHub
    from served import ServedRouter

REPO = Path(__file__).resolve().parent.parent

Handler = Callable[[httpx.Request], httpx.Response]


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli.cli, list(args), input=input)


def assert_clean_error(result: Result, *needles: str) -> None:
    """Exit 1 with one `error: ...` line on stderr that holds every needle; no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], None]:
    """Point the CLI at a mock server: ``server(handler)``."""
    monkeypatch.delenv("VLLAMA_API_KEY", raising=False)
    monkeypatch.setenv("VLLAMA_HOST", "127.0.0.1:1")

    real = httpx.Client

    def use(handler: Handler) -> None:
        def client(*args: Any, **kwargs: Any) -> httpx.Client:
            return real(*args, **kwargs, transport=httpx.MockTransport(handler))

        monkeypatch.setattr(httpx, "Client", client)

    return use


class _Body(httpx.SyncByteStream):
    """A response body that sends `chunks`, then raises `error` (a connection cut, a Ctrl-C)."""

    def __init__(self, chunks: list[bytes], error: BaseException) -> None:
        self.chunks = chunks
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise self.error


def status(state: str, reason: str = "") -> dict[str, Any]:
    return {"name": "m:latest", "state": state, "reason": reason}


# --- the server address -------------------------------------------------------------


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:11434"),
    ("box:8080", "http://box:8080"),
    ("https://box", "https://box:11434"),
    ("[::1]", "http://[::1]:11434"),
    ("::1", "http://[::1]:11434"),
    ("[::1]:9000", "http://[::1]:9000"),
    ("http://proxy/vllama/", "http://proxy:11434/vllama"),
    ("http://proxy:80/vllama", "http://proxy:80/vllama"),
])
def test_host_forms(host: str, url: str) -> None:
    assert cli._base_url(host) == url


@pytest.mark.parametrize("host", ["127.0.0.1:abc", "http://[::1", "ftp://box"])
def test_bad_host_is_a_one_line_error(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLAMA_HOST", raising=False)
    assert_clean_error(invoke("ps", "--host", host), "invalid server address", host)


def test_server_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import free_port

    monkeypatch.setenv("VLLAMA_HOST", f"127.0.0.1:{free_port()}")
    for args in (["ps"], ["ps", "--json"], ["list"], ["logs", "m"], ["start", "m"], ["reload"], ["run", "m", "hi"]):
        r = invoke(*args)
        assert_clean_error(r, "cannot reach vllama")
        if "--json" in args:  # a script reading JSON gets JSON, with the same words
            assert json.loads(r.stdout) == {"error": r.stderr.strip().removeprefix("error: ")}
        else:
            assert r.stdout == ""


def test_hung_server_is_an_error_for_queries_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes the connection and never answers: `ps` and `list` used to wait forever."""
    import socket

    monkeypatch.setattr(cli, "QUERY_TIMEOUT", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as hung:  # listens, never accepts nor answers
        monkeypatch.setenv("VLLAMA_HOST", f"127.0.0.1:{hung.getsockname()[1]}")
        for args in (["ps"], ["list"]):
            assert_clean_error(invoke(*args), "did not answer in time")


# --- errors from the server -------------------------------------------------------


def test_json_commands_fail_in_json_too(server: Callable[[Handler], None]) -> None:
    server(lambda req: httpx.Response(400, json={"error": "models[0].port: bad"}))
    for args in (["reload", "--json"], ["start", "m", "--json"]):
        r = invoke(*args)
        assert_clean_error(r, "models[0].port: bad (HTTP 400)")
        assert json.loads(r.stdout) == {"error": "models[0].port: bad (HTTP 400)"}


def test_long_error_stays_on_one_line(server: Callable[[Handler], None]) -> None:
    """Piped stderr is 80 columns to rich: it wrapped long errors over several lines."""
    message = "the new registry does not fit: " + "x" * 200
    server(lambda req: httpx.Response(400, json={"error": message}))
    assert_clean_error(invoke("reload"), message, "(HTTP 400)")


def test_error_with_brackets_is_printed_as_is(server: Callable[[Handler], None]) -> None:
    """A model name or vLLM message with `[/x]` in it raised rich's MarkupError."""
    server(lambda req: httpx.Response(404, json={"error": 'model "[/x]" not found'}))
    assert_clean_error(invoke("start", "[/x]"), 'model "[/x]" not found (HTTP 404)')


@pytest.mark.parametrize("body", [b"[1, 2]", b'"busy"', b"<html>bad gateway</html>", b""])
def test_error_body_that_is_not_ollamas(server: Callable[[Handler], None], body: bytes) -> None:
    server(lambda req: httpx.Response(502, content=body))
    assert_clean_error(invoke("ps"), "(HTTP 502)")


def test_openai_shaped_error_shows_its_message(server: Callable[[Handler], None]) -> None:
    server(lambda req: httpx.Response(500, json={"error": {"message": "engine died", "type": "x"}}))
    assert_clean_error(invoke("ps"), "engine died (HTTP 500)")


def test_missing_key_hints_at_the_variable(server: Callable[[Handler], None]) -> None:
    server(lambda req: httpx.Response(401, json={"error": "missing or invalid API key"}))
    assert_clean_error(invoke("ps"), "missing or invalid API key", "$VLLAMA_API_KEY")


@pytest.mark.parametrize("error", [httpx.ReadTimeout("timed out"), httpx.RemoteProtocolError("peer closed"),
                                   httpx.ReadError("reset")])
def test_transport_error_before_the_answer(server: Callable[[Handler], None], error: httpx.HTTPError) -> None:
    def fail(req: httpx.Request) -> httpx.Response:
        raise error

    server(fail)
    assert_clean_error(invoke("ps"), "vllama at http://127.0.0.1:1")


def test_logs_connection_cut_mid_stream(server: Callable[[Handler], None]) -> None:
    """`logs -f` when the server goes away: what came, then one error line (was a traceback)."""
    server(lambda req: httpx.Response(200, stream=_Body([b"line 1\n"], httpx.RemoteProtocolError("peer closed"))))
    r = invoke("logs", "-f", "m")
    assert r.stdout == "line 1\n"
    assert_clean_error(r, "connection to vllama at http://127.0.0.1:1 lost")


def test_run_connection_cut_mid_answer(server: Callable[[Handler], None]) -> None:
    line = json.dumps({"message": {"role": "assistant", "content": "Hel"}, "done": False}).encode() + b"\n"
    server(lambda req: httpx.Response(200, stream=_Body([line], httpx.ReadError("reset"))))
    r = invoke("run", "m", "hi")
    assert r.stdout.startswith("Hel")
    assert_clean_error(r, "lost")


# --- start / stop / restart ----------------------------------------------------------


def test_start_that_ends_missing_exits_nonzero_without_waiting(server: Callable[[Handler], None],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """It polled until `ready` or `failed` only: a `missing` model kept it waiting 15 minutes."""
    polls: list[int] = []

    def sleep(_: float) -> None:
        polls.append(1)
        assert len(polls) < 10, "still polling a model that will not start"

    monkeypatch.setattr(cli.time, "sleep", sleep)

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            return httpx.Response(202, json=status("starting", "waiting for its turn"))
        return httpx.Response(200, json=status("missing", "not downloaded: vllama pull m"))

    server(handler)
    r = invoke("start", "m")
    assert r.exit_code == 1, r.output
    assert "missing" in r.stdout and "vllama pull m" in r.stdout


def test_start_gives_up_after_the_deadline(server: Callable[[Handler], None],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cli.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 60))
    server(lambda req: httpx.Response(202 if req.method == "POST" else 200, json=status("starting", "loading")))
    r = invoke("start", "m", "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["state"] == "starting"  # --json: only JSON on stdout
    assert "still starting" in r.stderr


def test_start_ready_and_no_wait(server: Callable[[Handler], None], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    answers = iter([status("starting", "launching"), status("ready", "answers /health")])
    server(lambda req: httpx.Response(200, json=next(answers)))
    r = invoke("start", "m")
    assert r.exit_code == 0 and r.stdout == "m:latest: ready (answers /health)\n"

    server(lambda req: httpx.Response(202, json=status("starting", "launching")))
    r = invoke("restart", "m", "--no-wait")
    assert r.exit_code == 0 and r.stdout == "m:latest: starting (launching)\n"


def test_stop_does_not_offer_waiting_for_ready() -> None:
    """`stop --help` offered `--no-wait: return without waiting for ready`, which it ignored."""
    assert "--no-wait" not in invoke("stop", "--help").stdout
    assert "--no-wait" in invoke("start", "--help").stdout


# --- tables ----------------------------------------------------------------------


def _ps(server: Callable[[Handler], None], row: dict[str, Any]) -> Result:
    """`vllama ps` against a server whose one model is `row` (no reload error)."""

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/vllama/config":
            return httpx.Response(200, json={"path": "x", "reload_error": None})
        return httpx.Response(200, json=[row])

    server(handler)
    return invoke("ps")


def test_ps_table_shows_reasons_with_brackets(server: Callable[[Handler], None],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal: the rich table, not tab-separated text
    monkeypatch.setenv("COLUMNS", "300")
    reason = "OSError: [Errno 98] in [/opt/vllm]"

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/vllama/config":
            return httpx.Response(200, json={"path": "x", "reload_error": "bad [/y] file"})
        return httpx.Response(200, json=[{**status("failed", reason), "devices": []}])

    server(handler)
    r = invoke("ps")
    assert r.exit_code == 0, r.exception
    assert "[Errno 98] in [/opt/vllm]" in r.stdout
    assert "bad [/y] file" in r.stderr


def test_ps_says_which_server_settings_wait_for_a_restart(server: Callable[[Handler], None]) -> None:
    """A saved server.port is not applied live: ps must say so, not leave the operator guessing."""

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/vllama/config":
            return httpx.Response(200, json={"path": "x", "reload_error": None, "restart_needed": ["server.port"]})
        return httpx.Response(200, json=[{**status("ready", ""), "devices": []}])

    server(handler)
    r = invoke("ps")
    assert r.exit_code == 0, r.exception
    assert "restart needed" in r.stderr and "server.port" in r.stderr


def test_ps_says_which_saved_changes_did_not_start(server: Callable[[Handler], None]) -> None:
    """A rolling replacement that failed left ps showing `ready` and nothing else: the file and
    the running server disagreed, and the next `vllama serve` failed the model."""
    error = "exited 4 times before it was ready; gave up: api_server.py: error: unrecognized arguments: --bogus-flag"

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/vllama/config":
            return httpx.Response(200, json={"path": "x", "reload_error": None, "restart_needed": [],
                                             "failed_changes": {"m:latest": error}})
        return httpx.Response(200, json=[{**status("ready", "answers /health"), "devices": []}])

    server(handler)
    r = invoke("ps")
    assert r.exit_code == 0, r.exception
    assert "saved change did not start" in r.stderr and "m:latest" in r.stderr
    assert "--bogus-flag" in " ".join(r.stderr.split()) and "vllama restart m:latest" in r.stderr


def test_list_shows_local_time(server: Callable[[Handler], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's times are UTC; the MODIFIED column showed them as if they were local."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        model = {"name": "m:latest", "digest": "abc", "size": 0, "download": "remote",
                 "modified_at": "2026-01-02T23:30:00.5+00:00"}
        server(lambda req: httpx.Response(200, json={"models": [model]}))
        r = invoke("list")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert r.exit_code == 0
    assert r.stdout.splitlines()[1].split("\t")[-1] == "2026-01-03 08:30:00"


def test_list_and_ps_sizes_read_at_every_scale(server: Callable[[Handler], None]) -> None:
    """A 3.4 MB model was listed as `0.0 GiB`; sizes use the units of `pull` and `rm`."""
    models = [{"name": f"m{i}:latest", "digest": "abc", "size": size, "download": "complete",
               "modified_at": "2026-01-02T23:30:00+00:00"} for i, size in enumerate([3_400_000, 4_700_000_000, 512])]
    server(lambda req: httpx.Response(200, json={"models": models}))
    r = invoke("list")
    assert r.exit_code == 0
    assert [line.split("\t")[2] for line in r.stdout.splitlines()[1:]] == ["3.2 MiB", "4.4 GiB", "512 B"]

    row = {**status("ready", ""), "devices": [], "memory_used": 300 << 20, "memory_budget": 1 << 30}
    r = _ps(server, row)
    assert r.exit_code == 0
    assert "300.0 MiB / 1.0 GiB" in r.stdout.splitlines()[1].split("\t")


# --- run ---------------------------------------------------------------------------


def test_run_ctrl_c_stops_the_answer_and_keeps_the_session(server: Callable[[Handler], None],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Like `ollama run`: Ctrl-C during an answer returns to the prompt (it ended the session)."""
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    line = json.dumps({"message": {"role": "assistant", "content": "Hel"}, "done": False}).encode() + b"\n"
    bodies: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(req.content))
        if len(bodies) == 1:
            return httpx.Response(200, stream=_Body([line], KeyboardInterrupt()))
        done = json.dumps({"message": {"role": "assistant", "content": "ok"}, "done": True}).encode()
        return httpx.Response(200, content=done + b"\n")

    server(handler)
    r = invoke("run", "m", input="first\nsecond\n/bye\n")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "ok" in r.stdout
    # The interrupted turn is not part of the conversation any more.
    assert [m["content"] for m in bodies[1]["messages"]] == ["second"]


# --- pull -------------------------------------------------------------------------


def test_pull_names_the_unreadable_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a broken models.yaml, `pull NAME` said only that NAME is not in the registry."""
    bad = tmp_path / "models.yaml"
    bad.write_text("models: [{name: tiny, source: x, max_model_len: lots}]\n")
    assert_clean_error(invoke("pull", "tiny", "--config", str(bad)),
                       "not in the registry", "max_model_len: expected int")


def test_pull_local_model_that_is_not_there(tmp_path: Path) -> None:
    reg = tmp_path / "models.yaml"
    reg.write_text("models: [{name: tiny, source: ./nowhere}]\n")
    assert_clean_error(invoke("pull", "tiny", "--config", str(reg)), "does not exist")


# `vllama pull ARGS` with huggingface_hub writing every 64 KiB rather than every 10 MiB (as it
# does a real model's), so that a test sees the download progress, and stop, in a 4 MiB file.
PULL_IN_SMALL_CHUNKS = """
import sys
from huggingface_hub import constants
from router.cli import cli
constants.DOWNLOAD_CHUNK_SIZE = 64 * 1024
cli(["pull", *sys.argv[1:]])
"""


def _slow_hub(h: FakeHub, tmp_path: Path) -> dict[str, str]:
    """Serve `org/slow` (4 MiB of weights in 64 chunks, 13 s in all) from `h`; the environment of a
    `vllama pull` of it into `tmp_path`."""
    import random

    h.add_repo("org/slow", {"config.json": b'{"model_type": "llama"}',
                            "model.safetensors": random.Random(0).randbytes(4 << 20)})
    h.delay("org/slow/model.safetensors", 0.2)
    env = {**os.environ, "HF_ENDPOINT": h.url, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home"), "VLLAMA_CONFIG": str(tmp_path / "none.yaml")}
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    return env


def _pull_under_way(env: dict[str, str], tmp_path: Path) -> subprocess.Popen[str]:
    """`vllama pull org/slow` in a process of its own, once it has written 256 KiB of the weights."""
    p = subprocess.Popen([sys.executable, "-c", PULL_IN_SMALL_CHUNKS, "org/slow"], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while sum(f.stat().st_size for f in (tmp_path / "hub").rglob("*.incomplete")) < 256 << 10:
        if time.monotonic() > deadline or p.poll() is not None:
            p.kill()
            raise AssertionError(p.communicate())
        time.sleep(0.05)
    return p


def test_pull_ctrl_c_stops_the_download_at_once(tmp_path: Path) -> None:
    """Ctrl-C stops the download at once, keeps what came, and exits 130 (128 + SIGINT; it was 1,
    as for any failure, so a script could not tell an interrupted pull from a failed one)."""
    with FakeHub() as h:
        p = _pull_under_way(_slow_hub(h, tmp_path), tmp_path)
        try:
            p.send_signal(signal.SIGINT)
            sent = time.monotonic()
            out, err = p.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            p.kill()
        h.wait_idle()
        served = h.bytes_served("org/slow/model.safetensors")
    assert took < 4, f"{took:.1f} s after Ctrl-C; {served} bytes served"
    assert served < 4 << 20
    assert p.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    # The bytes received are kept: the next pull resumes from them.
    assert any(f.stat().st_size for f in (tmp_path / "hub").rglob("*.incomplete"))


def test_rm_while_vllama_pull_runs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vllama rm` (no server) while `vllama pull` of the same model runs in another process: refused
    at once, the pull's files left alone; once the pull has stopped, rm deletes them. (There was
    no lock: rm deleted the partial file under the running pull.)"""
    from conftest import free_port

    with FakeHub() as h:
        env = _slow_hub(h, tmp_path)
        for var in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "VLLAMA_CONFIG"):
            monkeypatch.setenv(var, env[var])
        monkeypatch.setenv("VLLAMA_HOST", f"127.0.0.1:{free_port()}")  # no server: rm deletes itself
        p = _pull_under_way(env, tmp_path)
        try:
            started = time.monotonic()
            assert_clean_error(invoke("rm", "org/slow"), "org/slow is being pulled right now")
            assert time.monotonic() - started < 5
            assert any(f.stat().st_size >= 256 << 10 for f in (tmp_path / "hub").rglob("*.incomplete"))
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=30)
        finally:
            p.kill()
        h.wait_idle()
    assert p.returncode == 130
    r = invoke("rm", "org/slow")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "deleted org/slow" in r.stdout
    assert not (tmp_path / "hub" / "models--org--slow").exists()


# --- rm, check, dev -----------------------------------------------------------------


def test_rm_without_server_resolves_registry_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no server, `rm llama3.2:3b` took the registry name for a repo id (and refused its tag)."""
    from conftest import free_port

    from router import hub

    reg = tmp_path / "models.yaml"
    reg.write_text("models: [{name: 'llama3.2:3b', source: meta-llama/Llama-3.2-3B-Instruct, revision: v1}]\n")
    deleted: list[tuple[str, str | None]] = []

    def delete(repo: str, revision: str | None = None) -> int:
        deleted.append((repo, revision))
        return 3 << 30

    monkeypatch.setattr(hub, "delete", delete)
    monkeypatch.setenv("VLLAMA_HOST", f"127.0.0.1:{free_port()}")
    r = invoke("rm", "llama3.2:3b", "--config", str(reg))
    assert r.exit_code == 0, r.output
    assert deleted == [("meta-llama/Llama-3.2-3B-Instruct", "v1")]
    assert "3.0 GiB freed" in r.stdout


def test_check_default_registry(tiny_model: Path, tmp_path: Path) -> None:
    # The default registry, with its model where the test session wrote it (a fresh clone has none yet).
    default = (REPO / "configs" / "models.yaml").read_text()
    assert "source: ../models/tiny " in default
    cfg = tmp_path / "models.yaml"
    cfg.write_text(default.replace("source: ../models/tiny ", f"source: {tiny_model} "))
    r = invoke("check", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert ": 1 model\n" in r.stdout
    # Piped: plain text, one line per model (rich folded every cell at 80 columns), and the
    # budget rounded as the need is (a default budget is the need: not "3" beside "3.1").
    row = next(line for line in r.stdout.splitlines() if line.startswith("│ tiny:latest"))
    assert "VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND" in row
    budget, needs = (c.strip() for c in row.split("│")[3:5])
    assert float(budget) >= float(needs)
    assert "\x1b[" not in r.stdout


def test_check_lists_on_demand_models(tiny_model: Path, tmp_path: Path) -> None:
    """`check` said "3 models" but its table listed only the `always` one."""
    default = (REPO / "configs" / "models.yaml").read_text()
    cfg = tmp_path / "models.yaml"
    cfg.write_text(default.replace("source: ../models/tiny ", f"source: {tiny_model} ") + f"""
  - name: lazy:latest
    source: {tiny_model}
    max_model_len: 2048
    load: on_demand
  - name: far:latest
    source: org/far
    url: http://127.0.0.1:9/v1
    load: on_demand
""")
    r = invoke("check", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert ": 3 models\n" in r.stdout
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("│ ")}
    assert "on demand" not in rows["tiny:latest"]
    lazy = [c.strip() for c in rows["lazy:latest"].split("│")[1:-1]]
    assert lazy[1] == "RAM (on demand)" and float(lazy[2]) >= float(lazy[3])
    assert lazy[5].startswith("on demand: placed when first requested")
    assert "remote (on demand)" in rows["far:latest"]
    # The devices table shows boot: only the `always` model is budgeted there.
    ram = next(line for line in r.stdout.splitlines() if line.startswith("│ RAM "))
    assert "tiny:latest" in ram and "lazy:latest" not in ram


def test_check_bad_path_is_clean(tmp_path: Path) -> None:
    r = invoke("check", "--config", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "cannot read" in r.stderr


def test_tiny_model_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert_clean_error(invoke("dev", "tiny-model", str(tmp_path)), "--force")
    assert (tmp_path / "notes.txt").exists()


def test_every_option_has_help() -> None:
    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[str, Any]]:
        for p in cmd.params:
            yield " ".join(path), p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    missing = [f"{where} {p.name}" for where, p in walk(cli.cli, ["vllama"])
               if p.param_type_name == "option" and not p.hidden and not p.help]
    assert missing == []


# --- against the real router -------------------------------------------------------


@pytest.fixture(scope="module")
def router() -> Iterator[ServedRouter]:
    with FakeVLLM("plain:latest") as fake:
        r = ServedRouter({"models": [{"name": "plain", "source": "/nonexistent/plain", "url": fake.url}]},
                         admin=True).start()
        yield r
        r.stop()


def test_real_router(router: ServedRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLAMA_HOST", router.url)
    monkeypatch.delenv("VLLAMA_API_KEY", raising=False)
    r = invoke("ps", "--json")
    assert r.exit_code == 0
    assert [m["name"] for m in json.loads(r.stdout)] == ["plain:latest"]
    r = invoke("list", "--json")
    assert [m["name"] for m in json.loads(r.stdout)] == ["plain:latest"]
    assert_clean_error(invoke("start", "nope"), "model 'nope' not found (HTTP 404)")
    assert_clean_error(invoke("logs", "plain"), "vLLama does not control it (HTTP 400)")
    r = invoke("run", "plain", "hi")
    assert r.exit_code == 0 and r.stdout == "w0 w1 w2 \n"


def test_ps_on_80_columns_keeps_name_and_state(server: Callable[[Handler], None],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every column was squeezed alike: `plai…` and no STATE column at all on 80 columns."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    row = {"name": "llama3.2:3b-instruct", "state": "restarting", "reason": "exited with 1: " + "x" * 60,
           "uptime": 3600.0, "port": 8100, "pid": 4242, "devices": ["GPU 0", "GPU 1"], "memory_used": 20 << 30,
           "memory_budget": 24 << 30, "vllm_running": 3, "vllm_waiting": 0, "queued": 0, "restarts": 2}
    r = _ps(server, row)
    assert r.exit_code == 0
    assert "llama3.2:3b-instruct" in r.stdout and "restarting" in r.stdout


# --- rm: the same answers with and without a server ---------------------------------


@pytest.fixture
def cached_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """`org/tiny` pulled from a fake Hub into a tmp cache, which this process's Hub environment
    points at; yields a models.yaml whose `manual` serves it."""
    from huggingface_hub import constants

    from router import hub

    with FakeHub() as h:
        h.add_repo("org/tiny", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * 1000})
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "VLLAMA_API_KEY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "home" / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        hub.pull("org/tiny")
        reg = tmp_path / "models.yaml"
        reg.write_text("models: [{name: manual, source: org/tiny, auto_pull: false, load: on_demand}]\n")
        monkeypatch.setenv("VLLAMA_CONFIG", str(reg))
        yield reg


def test_rm_by_repo_id_with_a_server_is_refused_while_the_model_runs(cached_tiny: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`vllama rm org/tiny` (the source of a ready model) deleted its files: /api/delete checked
    only registry names. Unknown names get Ollama's not-found, as with no server."""
    from router import hub
    from router.lifecycle import State

    r = ServedRouter({"models": [{"name": "manual", "source": "org/tiny", "auto_pull": False,
                                  "load": "on_demand"}]}, admin=True).start()
    try:
        monkeypatch.setenv("VLLAMA_HOST", r.url)
        rt = r.fleet.runtimes["manual:latest"]
        r.call(r.fleet._set(rt, State.READY, "set by the test"))
        assert_clean_error(invoke("rm", "org/tiny"), 'model "manual:latest" serves org/tiny and is ready; '
                                                     "stop it first (`vllama stop manual:latest`) (HTTP 409)")
        assert hub.local_snapshot("org/tiny").complete
        assert_clean_error(invoke("rm", "nope"), "model 'nope' not found (HTTP 404)")
        r.call(r.fleet._set(rt, State.STOPPED, "set by the test"))
        res = invoke("rm", "org/tiny")
        assert res.exit_code == 0 and res.stdout == "deleted org/tiny\n", (res.output, res.exception)
        assert hub.local_snapshot("org/tiny") is None
        assert_clean_error(invoke("rm", "org/tiny"), "model 'org/tiny' not found (HTTP 404)")
    finally:
        r.stop()


def test_rm_without_a_server_says_not_found_as_the_server_does(cached_tiny: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With no server nothing runs through vLLama, so the repo id deletes; an unknown plain name
    was looked up in the cache as a repo id (`nope is not in the cache at ...`)."""
    from conftest import free_port

    from router import hub

    monkeypatch.setenv("VLLAMA_HOST", f"127.0.0.1:{free_port()}")
    assert_clean_error(invoke("rm", "nope"), "model 'nope' not found")
    res = invoke("rm", "org/tiny")
    assert res.exit_code == 0 and res.stdout.startswith("deleted org/tiny ("), (res.output, res.exception)
    assert hub.local_snapshot("org/tiny") is None
    assert_clean_error(invoke("rm", "org/tiny"), "org/tiny is not in the cache at")  # local: the path helps
    cached_tiny.write_text("models: [")
    assert_clean_error(invoke("rm", "nope"), "model 'nope' not found; the registry", "could not be read")
