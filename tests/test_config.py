"""The registry: every validation rule reports the model and key, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import config, engine, supervisor
from router.config import ConfigError, normalize_name, parse, parse_duration

REPO = Path(__file__).resolve().parent.parent


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(data)
    return e.value.problems


def test_minimal_model_gets_defaults_and_latest_tag() -> None:
    cfg = parse({"models": [{"name": "tiny", "source": "org/tiny"}]})
    m = cfg.models[0]
    assert m.name == "tiny:latest"
    assert m.load == "always" and m.keep_alive == "5m" and m.port is None
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 11434


def test_wrong_type_names_model_index_and_key() -> None:
    assert problems({"models": [{"name": "a", "source": "x"}, {"name": "b", "source": "y", "max_model_len": "lots"}]}) == [
        'models[1].max_model_len: expected int, got "lots"'
    ]


def test_every_problem_is_listed_not_just_the_first() -> None:
    found = problems({
        "server": {"port": "x", "colour": "red"},
        "models": [
            {"name": "a", "source": "x", "bogus": 1},
            {"name": "b"},
            {"name": "c", "source": "z", "aliases": "c2"},
        ],
    })
    assert 'server.port: expected int, got "x"' in found
    assert any(p.startswith("server.colour: unknown key") for p in found)
    assert any(p.startswith("models[0].bogus: unknown key") for p in found)
    assert "models[1]: missing required key 'source'" in found
    assert 'models[2].aliases: expected list of str, got "c2"' in found
    assert len(found) == 5


def test_duplicate_names_and_aliases_are_rejected() -> None:
    found = problems({"models": [
        {"name": "a", "source": "x", "aliases": ["shared"]},
        {"name": "a:latest", "source": "y"},
        {"name": "b", "source": "z", "aliases": ["shared:latest"]},
    ]})
    assert "models[1].name: 'a:latest' is already used by models[0] (a:latest)" in found
    assert "models[2].aliases[0]: 'shared:latest' is already used by models[0] (a:latest)" in found
    assert len(found) == 2  # a name used twice is one problem, not also a program-name clash


def test_semantic_checks() -> None:
    found = problems({"models": [
        {"name": "a", "source": "", "max_model_len": 0, "keep_alive": "300", "port": 11434},
        {"name": "b", "source": "y", "gpus": [0], "tensor_parallel": 2, "vram_gb": 4, "vram_fraction": 0.5},
        {"name": "c", "source": "y", "url": "gpu-box:8000", "env": {"BAD-NAME": "1"}},
    ]})
    assert "models[0].source: must not be empty" in found
    assert "models[0].max_model_len: must be ≥ 1, got 0" in found
    assert 'models[0].keep_alive: time: missing unit in duration "300"' in found
    assert "models[0].port: 11434 is already used by the router" in found
    assert "models[1].gpus: 1 GPUs listed but tensor_parallel is 2" in found
    assert "models[1]: set vram_gb or vram_fraction, not both" in found
    assert "models[2].url: must start with http:// or https://, got 'gpu-box:8000'" in found
    assert "models[2].env: 'BAD-NAME' is not a valid environment variable name" in found


@pytest.mark.parametrize("nice", [-5, 20])
def test_engine_nice_is_a_priority_below_the_routers(nice: int) -> None:
    # Negative values would need privileges, and would put vLLM above the router.
    assert problems({"engine": {"nice": nice}, "models": []}) == [
        f"engine.nice: must be 0 (same priority as the router) to 19, got {nice}"]
    assert parse({"engine": {"nice": 0}}).engine.nice == 0


def test_top_level_must_be_a_mapping_and_models_a_list() -> None:
    assert problems([1, 2]) == ["file: expected a mapping at the top level, got [1,2]"]
    assert problems({"models": {"a": 1}}) == ['models: expected a list, got {"a":1}']


def test_lookup_by_name_alias_and_implied_tag() -> None:
    cfg = parse({"models": [{"name": "llama3:8b", "source": "x", "aliases": ["chat"]}]})
    assert cfg.lookup("llama3:8b").name == "llama3:8b"
    assert cfg.lookup("chat").name == "llama3:8b"
    assert cfg.lookup("chat:latest").name == "llama3:8b"
    assert cfg.lookup("llama3") is None  # llama3 means llama3:latest, which is not served


def test_lookup_compares_names_as_ollama_does() -> None:
    """Case-insensitive, default host registry.ollama.ai, namespace library and tag latest."""
    cfg = parse({"models": [{"name": "tiny", "source": "x", "aliases": ["Small"]},
                            {"name": "hf.co/Org/Repo:Q4", "source": "y"}]})
    for name in ("TINY", "Tiny:Latest", "library/tiny", "registry.ollama.ai/library/tiny:latest",
                 "https://registry.ollama.ai/library/tiny", "SMALL", "library/small:LATEST"):
        assert cfg.lookup(name).name == "tiny:latest", name
    assert cfg.lookup("HF.CO/org/repo:q4").name == "hf.co/Org/Repo:Q4"
    for name in ("other/tiny", "tiny:8b", "example.com/library/tiny", "tin", "hf.co/org/repo"):
        assert cfg.lookup(name) is None, name


def test_names_that_differ_only_by_case_each_keep_their_model() -> None:
    """An exact match comes first; a name that matches two entries only by case gets the first."""
    cfg = parse({"models": [{"name": "Big", "source": "x"}, {"name": "big", "source": "y"}]})
    assert cfg.lookup("Big").source == "x" and cfg.lookup("big").source == "y"
    assert cfg.lookup("big:latest").source == "y" and cfg.lookup("BIG").source == "x"


def test_local_sources_are_relative_to_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "conf" / "models.yaml"
    f.parent.mkdir()
    f.write_text("models:\n  - {name: a, source: ../models/a}\n  - {name: b, source: org/b}\n")
    cfg = config.load(f)
    assert cfg.source_path(cfg.models[0]) == str(tmp_path / "models" / "a")
    assert cfg.source_path(cfg.models[1]) == "org/b"


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  - name: a\n    source: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert e.value.problems[0].startswith("invalid YAML: line")


@pytest.mark.parametrize("value,seconds", [
    ("5m", 300), ("1h30m", 5400), ("0", 0), (0, 0), (10, 10), (2.5, 2.5), ("-1m", float("inf")), (-1, float("inf")),
    ("250ms", 0.25), ("+5m", 300), (".5s", 0.5), ("2.s", 2), ("1h0.5m", 3630), ("1\u00b5s", 1e-6), ("-0", 0),
    ("-0s", 0), ("+0", 0),
])
def test_keep_alive_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value,message", [("300", 'time: missing unit in duration "300"'),
                                           ("-3.5", 'time: missing unit in duration "-3.5"'),
                                           ("soon", 'time: invalid duration "soon"'),
                                           ("\u0663m", 'time: invalid duration "\u0663m"'),  # Arabic-Indic 3
                                           (".m", 'time: invalid duration ".m"'),
                                           ("+-5m", 'time: invalid duration "\\+-5m"'),
                                           ("5M", 'time: invalid duration "5M"')])
def test_keep_alive_errors_use_ollamas_wording(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_name_normalisation() -> None:
    assert normalize_name("tiny") == "tiny:latest"
    assert normalize_name("org/model:7b") == "org/model:7b"
    assert normalize_name("registry.local/ns/model") == "registry.local/ns/model:latest"


@pytest.mark.parametrize("path", ["configs/models.yaml", "configs/models.example.yaml"])
def test_shipped_configs_validate(path: str) -> None:
    cfg = config.load(REPO / path)
    assert cfg.models


def test_a_reload_refuses_an_empty_file_but_not_an_empty_list(tmp_path: Path) -> None:
    p = tmp_path / "models.yaml"
    p.write_text("")
    assert config.load(p).models == []  # at startup: nothing to serve yet
    with pytest.raises(ConfigError, match="empty"):
        config.load_settled(p)  # on a reload: a save caught half-way, not "stop everything"
    p.write_text("models: []\n")
    assert config.load_settled(p).models == []


def test_a_reload_reads_again_a_file_that_changes_under_the_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "models.yaml"
    whole = "models:\n  - {name: a, source: org/a}\n  - {name: b, source: org/b}\n"
    p.write_text(whole.split("  - {name: b")[0])  # the save so far: valid YAML, one model short
    real_load, reads = config.load, []

    def load_while_saving(path: Path, **kw: object) -> config.Config:
        c = real_load(path, **kw)  # type: ignore[arg-type]
        reads.append(len(c.models))
        if len(reads) == 1:
            p.write_text(whole)  # the rest of the save lands during the first read
        return c
    monkeypatch.setattr(config, "load", load_while_saving)
    assert [m.name for m in config.load_settled(p, pause=0).models] == ["a:latest", "b:latest"]
    assert reads == [1, 2]


# --- values that would only fail at launch are refused by validation ------------------------


@pytest.mark.parametrize("section,key,value,message", [
    ("server", "max_inflight", 0, "must be ≥ 1, got 0"),
    ("server", "port", 0, "must be in [1, 65535], got 0"),
    ("server", "port", 70000, "must be in [1, 65535], got 70000"),
    ("server", "cold_start_timeout", 0, "must be > 0, got 0"),
    ("server", "shutdown_grace", -1, "must be ≥ 0, got -1"),
    ("server", "max_body_mb", 0, "must be > 0, got 0"),
    ("server", "connect_timeout", -5, "must be > 0, got -5"),
    ("server", "first_token_timeout", 0, "must be > 0, got 0"),
    ("server", "between_tokens_timeout", 0.0, "must be > 0, got 0.0"),
    ("server", "reserve_gb", -1, "must be ≥ 0, got -1"),
    ("engine", "base_port", 0, "must be in [1, 65535], got 0"),
    ("engine", "base_port", 70000, "must be in [1, 65535], got 70000"),
    ("engine", "stopwaitsecs", -1, "must be ≥ 0, got -1"),
    ("engine", "startretries", -1, "must be ≥ 0, got -1"),
])
def test_server_and_engine_numbers_out_of_range_name_the_key(section: str, key: str, value: object, message: str) -> None:
    assert problems({section: {key: value}, "models": []}) == [f"{section}.{key}: {message}"]


@pytest.mark.parametrize("key,value,message", [
    ("port", 0, "must be in [1, 65535], got 0"),
    ("port", 65536, "must be in [1, 65535], got 65536"),
    ("max_model_len", -1, "must be ≥ 1, got -1"),
    ("tensor_parallel", 0, "must be ≥ 1, got 0"),
    ("vram_gb", 0, "must be > 0, got 0"),
    ("vram_fraction", 0, "must be in (0, 1], got 0"),
    ("vram_fraction", 1.5, "must be in (0, 1], got 1.5"),
    ("memory_gb", -2, "must be > 0, got -2"),
    ("max_queue", -1, "must be ≥ 0, got -1"),
    ("gpus", [0, 0], "GPU indices must be ≥ 0 and distinct, got [0, 0]"),
    ("gpus", [-1], "GPU indices must be ≥ 0 and distinct, got [-1]"),
])
def test_model_numbers_out_of_range_name_the_model_and_key(key: str, value: object, message: str) -> None:
    assert problems({"models": [{"name": "a", "source": "x"}, {"name": "b", "source": "y", key: value}]}) == [
        f"models[1].{key}: {message}"]


def test_limits_at_their_edges_are_accepted() -> None:
    cfg = parse({
        "server": {"port": 65535, "max_inflight": 1, "shutdown_grace": 0, "reserve_gb": 0, "cold_start_timeout": 0.1},
        "engine": {"base_port": 1, "stopwaitsecs": 0, "startretries": 0},
        "models": [{"name": "a", "source": "x", "port": 1, "max_model_len": 1, "vram_fraction": 1, "max_queue": 0,
                    "gpus": [0, 3], "tensor_parallel": 2}],
    })
    assert cfg.server.max_inflight == 1 and cfg.engine.base_port == 1 and cfg.models[0].vram_fraction == 1


def test_a_wrong_type_is_still_reported_as_a_type_not_a_limit() -> None:
    assert problems({"server": {"max_inflight": "many"}, "models": [{"name": "a", "source": "x", "port": "high"}]}) == [
        'server.max_inflight: expected int, got "many"', 'models[0].port: expected int, got "high"']


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_must_be_finite(value: float) -> None:
    found = problems({"server": {"max_body_mb": value, "shutdown_grace": value},
                      "models": [{"name": "a", "source": "x", "vram_gb": value}]})
    assert found == [f"server.max_body_mb: must be a finite number, got {value}",
                     f"server.shutdown_grace: must be a finite number, got {value}",
                     f"models[0].vram_gb: must be a finite number, got {value}"]


def test_keep_alive_nan_is_not_a_duration() -> None:
    assert problems({"models": [{"name": "a", "source": "x", "keep_alive": float("nan")}]}) == [
        'models[0].keep_alive: time: invalid duration "NaN"']


def test_a_number_out_of_range_does_not_hide_the_models_other_problems() -> None:
    found = problems({"models": [{"name": "a", "source": "x", "port": 11434, "max_model_len": 0}]})
    assert found == ["models[0].max_model_len: must be ≥ 1, got 0", "models[0].port: 11434 is already used by the router"]


# Values supervisord cannot carry in environment=; every one of them also fails `quote_env`.
BAD_ENV = [
    ('has "quotes"', 'must not contain " (supervisord cannot carry it)'),
    ("a ;comment", "must not have ; or # after whitespace (supervisord reads the rest as a comment)"),
    ("a\t#comment", "must not have ; or # after whitespace (supervisord reads the rest as a comment)"),
    ("line\nbreak", "must not contain newlines, carriage returns or NUL (supervisord cannot carry them)"),
    ("carriage\rreturn", "must not contain newlines, carriage returns or NUL (supervisord cannot carry them)"),
    ("nul\x00", "must not contain newlines, carriage returns or NUL (supervisord cannot carry them)"),
    ("\ud800", "must be valid Unicode text (it holds a lone surrogate)"),
]
# ...and argv elements it cannot carry on command=; every one of them also fails `quote_arg`.
BAD_ARGS = BAD_ENV[3:]


@pytest.mark.parametrize("value,message", BAD_ENV)
def test_environment_values_supervisord_cannot_carry_are_refused(value: str, message: str) -> None:
    found = problems({"engine": {"env": {"E": value}}, "models": [{"name": "a", "source": "x", "env": {"M": value}}]})
    assert found == [f"engine.env.E: {message}", f"models[0].env.M: {message}"]
    with pytest.raises(ValueError, match="environment value of X"):
        supervisor.quote_env({"X": value})  # the same rule where the program is rendered


def test_environment_names_are_checked_for_the_engine_too() -> None:
    assert problems({"engine": {"env": {"NOT-A-NAME": "1"}}}) == [
        "engine.env: 'NOT-A-NAME' is not a valid environment variable name"]


@pytest.mark.parametrize("value,message", BAD_ARGS)
def test_arguments_supervisord_cannot_carry_are_refused_wherever_they_reach_vllm(value: str, message: str) -> None:
    found = problems({
        "engine": {"python": f"/py{value}", "args": ["--ok", value]},
        "models": [{"name": "a", "source": f"org/a{value}", "revision": value, "tool_call_parser": value,
                    "reasoning_parser": value, "vllm_args": [value]}],
    })
    assert found == [
        f"engine.python: {message}",
        f"engine.args[1]: {message}",
        *(f"models[0].{key}: {message}"
          for key in ("source", "revision", "tool_call_parser", "reasoning_parser", "vllm_args[0]")),
    ]
    with pytest.raises(ValueError, match="argument"):
        supervisor.quote_arg(value)


def test_a_model_name_is_an_argument_too() -> None:
    # Whitespace is refused by the name rule already; NUL is not whitespace.
    assert problems({"models": [{"name": "a\x00b", "source": "x"}]}) == [
        "models[0].name: must not contain newlines, carriage returns or NUL (supervisord cannot carry them)"]


def test_what_validation_accepts_renders_as_a_supervisord_program(tmp_path: Path) -> None:
    hostile = ["100%", "quote's", "semi;colon", "a ;b", "tab\t#hash", "$(id)", "", "é", "\x0b\x85\u2028"]
    cfg = parse({"engine": {"args": hostile, "env": {"PCT": "50%", "SPACE": "x y", "QUOTE": "it's", "COMMA": "a,b"}},
                 "models": [{"name": "a", "source": "org/a", "vllm_args": hostile, "env": {"HASH": "a#b"}}]})
    paths = supervisor.Paths(tmp_path / "run")
    paths.create()
    assert "command=" in engine.program(cfg, cfg.models[0], 8100).render(paths)


@pytest.mark.parametrize("state_dir,message", [
    ("/tmp/with space", "must not contain whitespace (supervisord's [include] splits paths at it)"),
    ("/tmp/50%", "must not contain % (supervisord expands it in paths)"),
    ('/tmp/q"uote', 'must not contain " (supervisord cannot carry it)'),
    ("/" + "d" * 90, "is too long: its unix socket path would be 107 bytes, over 100"),
])
def test_state_dirs_supervisord_cannot_use_are_refused(state_dir: str, message: str) -> None:
    assert problems({"server": {"state_dir": state_dir}}) == [f"server.state_dir: {state_dir!r} {message}"]
    with pytest.raises(supervisor.SupervisorError, match="state dir"):
        supervisor.Paths(Path(state_dir)).create()  # the same rule when serve creates it


def test_a_relative_state_dir_is_checked_where_it_will_be(tmp_path: Path) -> None:
    conf = tmp_path / "my configs" / "models.yaml"
    conf.parent.mkdir()
    conf.write_text("server: {state_dir: run}\n")
    with pytest.raises(ConfigError) as e:
        config.load(conf)
    where = str(conf.parent / "run")
    assert e.value.problems == [f"server.state_dir: {where!r} must not contain whitespace (supervisord's [include] splits paths at it)"]
    conf.write_text("server: {state_dir: ../run}\n")
    assert config.load(conf).server.state_dir == "../run"
