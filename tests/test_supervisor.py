"""supervisord configuration: generated programs survive supervisord's own parser intact."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from supervisor.options import ServerOptions

from router import config, engine, supervisor
from router.supervisor import Paths, Program, quote_env, render_main_conf, write_programs

HOSTILE = [
    "plain",
    "two words",
    "semi;colon",
    "space ;semicolon",
    "tab\t#hash",
    "a # comment?",
    "100%",
    "%(ENV_HOME)s",
    "quote's",
    'double "quoted"',
    '{"json": [1, 2], "k": "v ; w"}',
    "$(rm -rf /) `id` && echo",
    "",
]


def parsed_programs(paths: Paths) -> dict[str, object]:
    """Load the config exactly as supervisord does and return its process configs by name."""
    paths.conf.write_text(render_main_conf(paths))
    opts = ServerOptions()
    opts.configfile = str(paths.conf)
    opts.process_config(do_usage=False)
    return {p.name: p for g in opts.process_group_configs for p in g.process_configs}


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path / "run")
    p.create()
    return p


def test_hostile_arguments_reach_the_process_as_one_argv_element_each(paths: Paths) -> None:
    argv = ("/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", *HOSTILE)
    write_programs(paths, [Program(name="vllm-x", argv=argv, env={})])
    proc = parsed_programs(paths)["vllm-x"]
    # supervisord execs shlex.split(command) (supervisor/process.py): no shell is involved.
    assert tuple(shlex.split(proc.command)) == argv


def test_environment_round_trips_and_carries_the_state_dir(paths: Paths) -> None:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "WITH_COMMA": "a,b", "PCT": "50%", "SPACE": "x y"}
    write_programs(paths, [Program(name="vllm-x", argv=("true",), env=env)])
    proc = parsed_programs(paths)["vllm-x"]
    assert proc.environment == {**env, "VLLAMA_STATE_DIR": str(paths.root)}


@pytest.mark.parametrize("value", ['has "quotes"', "a ;comment", "line\nbreak"])
def test_environment_values_supervisord_cannot_carry_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        quote_env({"X": value})


def test_program_options_for_vllm(paths: Paths) -> None:
    write_programs(paths, [Program(name="vllm-x", argv=("true",), env={}, stopwaitsecs=7)])
    proc = parsed_programs(paths)["vllm-x"]
    assert proc.stopasgroup and proc.killasgroup  # EngineCore and workers die with the server
    assert proc.stopwaitsecs == 7
    assert proc.autostart is False  # models start in order, driven by the router
    assert proc.autorestart is False and proc.startretries == 0  # and restart in order, by the router too
    assert proc.stdout_logfile == str(paths.log("vllm-x"))


def test_nice_runs_the_program_under_nice_with_its_argv_intact(paths: Paths) -> None:
    argv = ("/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server", *HOSTILE)
    write_programs(paths, [Program(name="vllm-n", argv=argv, env={}, nice=10),
                           Program(name="vllm-0", argv=argv, env={}, nice=0)])
    progs = parsed_programs(paths)
    niced = shlex.split(progs["vllm-n"].command)
    assert Path(niced[0]).name == "nice" and niced[1:3] == ["-n", "10"] and tuple(niced[3:]) == argv
    assert tuple(shlex.split(progs["vllm-0"].command)) == argv


def test_rewriting_the_same_programs_leaves_files_untouched(paths: Paths) -> None:
    progs = [Program(name="vllm-a", argv=("a",), env={}), Program(name="vllm-b", argv=("b",), env={})]
    write_programs(paths, progs)
    before = {f: f.stat().st_mtime_ns for f in paths.programs.glob("*.conf")}
    write_programs(paths, progs)
    assert {f: f.stat().st_mtime_ns for f in paths.programs.glob("*.conf")} == before
    write_programs(paths, progs[:1])
    assert [f.name for f in paths.programs.glob("*.conf")] == ["vllm-a.conf"]


def test_runtime_dir_is_private_and_socket_only(paths: Paths) -> None:
    assert paths.root.stat().st_mode & 0o777 == 0o700
    text = render_main_conf(paths)
    assert "[unix_http_server]" in text and "inet_http_server" not in text
    assert f"file={paths.socket}" in text


def test_vllm_program_from_the_registry(paths: Paths, tmp_path: Path) -> None:
    cfg = config.parse({
        "engine": {"args": ["--enforce-eager"], "env": {"A": "engine", "B": "engine"}},
        "models": [{"name": "m", "source": "./m", "max_model_len": 512, "embedding": True,
                    "tool_call_parser": "hermes", "vllm_args": ["--max-num-seqs", "8"], "env": {"B": "model"}}],
    }, path=tmp_path / "models.yaml")
    prog = engine.program(cfg, cfg.models[0], 8123, extra_args=["--gpu-memory-utilization", "0.5"],
                          extra_env={"CUDA_VISIBLE_DEVICES": "1"})
    argv = list(prog.argv)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "m")
    assert argv[argv.index("--served-model-name") + 1] == "m:latest"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    # the operator's arguments come last so they can override ours
    assert argv[-4:] == ["--gpu-memory-utilization", "0.5", "--enforce-eager", "--max-num-seqs", "8"][-4:]
    assert prog.env["A"] == "engine" and prog.env["B"] == "model"
    assert prog.env["CUDA_VISIBLE_DEVICES"] == "1" and prog.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert prog.name == "vllm-m_latest-8123"
    assert prog.nice == 10  # below the router by default (engine.nice)


async def test_a_cancelled_call_keeps_the_connection_until_its_thread_is_done(paths: Paths) -> None:
    """Shutdown cancels background tasks mid-call; the XML-RPC thread cannot be stopped, and a
    second call on the same connection meanwhile failed (http.client.CannotSendRequest), which
    once left the vLLMs running after vllama exited."""
    import asyncio
    import threading
    import time

    from router.supervisor import Supervisor

    sup = Supervisor(paths)
    busy = threading.Lock()
    overlaps: list[str] = []

    def call_sync(method: str, *args: object) -> str:
        if not busy.acquire(blocking=False):
            overlaps.append(method)  # two threads on one connection
            return method
        try:
            time.sleep(0.3)
            return method
        finally:
            busy.release()
    sup._call_sync = call_sync  # type: ignore[method-assign]

    first = asyncio.create_task(sup.call("supervisor.stopProcess", "a"))
    await asyncio.sleep(0.1)
    first.cancel()
    assert await sup.call("supervisor.stopAllProcesses") == "supervisor.stopAllProcesses"
    assert first.cancelled() and overlaps == []


def test_supervisord_runs_in_its_own_group_of_our_session_and_dies_with_vllama(tmp_path: Path) -> None:
    """Its own group (a terminal's Ctrl-C reaches vllama alone), our session (vLLM's nice
    counts against the router: one autogroup), and SIGTERM when vllama dies, even by SIGKILL."""
    code = ("import sys, time; from pathlib import Path; from router.supervisor import Paths, Supervisor; "
            "s = Supervisor.spawn(Paths(Path(sys.argv[1]))); print(s.process.pid, flush=True); time.sleep(600)")
    vllama = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(vllama.stdout.readline())  # type: ignore[union-attr]
        assert os.getpgid(pid) == pid != os.getpgid(vllama.pid)
        assert os.getsid(pid) == os.getsid(vllama.pid)
        vllama.kill()
        vllama.wait()
        psutil.Process(pid).wait(30)  # gone: PDEATHSIG told it to stop
    finally:
        vllama.kill()
        supervisor.kill_stale(tmp_path / "run")


def test_a_second_serve_on_the_same_state_dir_is_refused_and_stops_nothing(paths: Paths) -> None:
    # Another vllama holds the state dir (a child process, as a second terminal's would be).
    code = ("import pathlib, sys; from router.supervisor import Paths, claim; "
            f"claim(Paths(pathlib.Path({str(paths.root)!r}))); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(supervisor.SupervisorError, match=rf"pid {holder.pid}\) is using"):
            supervisor.claim(paths)
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder, however it died: the next serve claims the dir.
    fd = supervisor.claim(paths)
    assert paths.lock.read_text().strip() == str(os.getpid())
    os.close(fd)


# --- how a process ended ------------------------------------------------------------------------


@pytest.mark.parametrize(("info", "expected"), [
    ({"statename": "EXITED", "exitstatus": -1, "spawnerr": "Bad exit code -1"}, supervisor.KILLED_BY_A_SIGNAL),
    ({"statename": "EXITED", "exitstatus": 1, "spawnerr": "Bad exit code 1"}, "exit status 1"),
    ({"statename": "FATAL", "exitstatus": None, "spawnerr": "can't find command 'vllm'"}, "can't find command 'vllm'"),
    ({"statename": "RUNNING", "exitstatus": 0, "spawnerr": ""}, None),
    (None, None),
])
def test_exit_status_from_process_info(info: dict[str, object] | None, expected: str | None) -> None:
    assert supervisor.exit_status(info) == expected


def test_the_logged_exit_is_the_programs_last() -> None:
    log = ("2026-12-03 14:00:00,000 WARN exited: vllm-a-8001 (exit status 1; not expected)\n"
           "2026-12-03 14:00:01,000 WARN exited: vllm-b-8002 (terminated by SIGTERM; not expected)\n"
           "2026-12-03 14:05:00,000 WARN exited: vllm-a-8001 (terminated by SIGKILL (core dumped); not expected)\n")
    assert supervisor.logged_exit(log, "vllm-a-8001") == "killed by SIGKILL (core dumped)"
    assert supervisor.logged_exit(log, "vllm-b-8002") == "killed by SIGTERM"
    assert supervisor.logged_exit(log, "vllm-a-800") is None


async def test_exit_cause_names_the_signal_or_status_from_real_supervisord(paths: Paths) -> None:
    """What a crash's reason says comes from supervisord: a signal (its info has only -1) and
    an exit within startsecs (its info says "Exited too quickly") are read from its log."""
    sup = supervisor.Supervisor.spawn(paths)
    try:
        await sup.apply([Program("sleeper", ("sleep", "60"), {}), Program("failer", ("sh", "-c", "exit 3"), {})])
        await sup.start("sleeper")
        await sup.start("failer")
        infos = await until_state(sup, "sleeper", "RUNNING")  # after startsecs (5 s)
        os.kill(infos["sleeper"]["pid"], signal.SIGKILL)
        infos = await until_state(sup, "sleeper", "EXITED")
        assert await sup.exit_cause("sleeper", infos["sleeper"]) == "killed by SIGKILL"
        infos = await until_state(sup, "failer", "BACKOFF", "FATAL")
        assert await sup.exit_cause("failer", infos["failer"]) == "exit status 3"
        assert await sup.exit_cause("failer", {"statename": "RUNNING"}) is None
    finally:
        await sup.shutdown()


async def until_state(sup: supervisor.Supervisor, name: str, *states: str) -> dict[str, dict[str, object]]:
    async with asyncio.timeout(20):
        while True:
            infos = await sup.processes()
            if infos[name]["statename"] in states:
                return infos
            await asyncio.sleep(0.1)


async def test_kill_takes_a_program_that_ignores_sigterm_and_its_children_at_once(paths: Paths) -> None:
    """A vLLM that is still initialising ignores SIGTERM (QA: Ctrl-C of a cold start took 20 s
    and more, supervisord's stopwaitsecs); `kill` ends its whole group without waiting, so no
    EngineCore is left behind, and supervisord restarts nothing."""
    sup = supervisor.Supervisor.spawn(paths)
    try:
        stubborn = "trap '' TERM; sleep 600 & echo $! > child; wait"
        await sup.apply([Program("stubborn", ("sh", "-c", stubborn), {}, stopwaitsecs=30)])
        await sup.start("stubborn")
        child = paths.root / "child"
        async with asyncio.timeout(10):
            while not child.exists() or not child.read_text().strip():
                await asyncio.sleep(0.05)
        leader = (await sup.processes())["stubborn"]["pid"]
        group = [psutil.Process(leader), psutil.Process(int(child.read_text()))]
        started = asyncio.get_running_loop().time()
        assert await sup.kill("stubborn") == leader
        _, alive = psutil.wait_procs(group, timeout=5)
        assert not alive and asyncio.get_running_loop().time() - started < 5
        infos = await until_state(sup, "stubborn", "BACKOFF", "FATAL", "EXITED")
        assert infos["stubborn"]["statename"] != "RUNNING"
        assert await sup.kill("stubborn") is None and await sup.kill("nosuch") is None
    finally:
        await sup.shutdown()
