"""supervisord configuration: generated programs survive supervisord's own parser intact."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from supervisor.options import ServerOptions

from router import config, engine
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
    write_programs(paths, [Program(name="vllm-x", argv=("true",), env={}, stopwaitsecs=7, startretries=2)])
    proc = parsed_programs(paths)["vllm-x"]
    assert proc.stopasgroup and proc.killasgroup  # EngineCore and workers die with the server
    assert proc.stopwaitsecs == 7 and proc.startretries == 2
    assert proc.autostart is False  # models start in order, driven by the router
    assert proc.stdout_logfile == str(paths.log("vllm-x"))


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
