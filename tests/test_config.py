"""The registry: every validation rule reports the model and key, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import config
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


def test_semantic_checks() -> None:
    found = problems({"models": [
        {"name": "a", "source": "", "max_model_len": 0, "keep_alive": "300", "port": 11434},
        {"name": "b", "source": "y", "gpus": [0], "tensor_parallel": 2, "vram_gb": 4, "vram_fraction": 0.5},
        {"name": "c", "source": "y", "url": "gpu-box:8000", "env": {"BAD-NAME": "1"}},
    ]})
    assert "models[0].source: must not be empty" in found
    assert "models[0].max_model_len: must be positive, got 0" in found
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
    ("250ms", 0.25),
])
def test_keep_alive_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value,message", [("300", 'time: missing unit in duration "300"'),
                                           ("soon", 'time: invalid duration "soon"')])
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
