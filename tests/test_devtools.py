"""The tiny test model: deterministic, complete, and loadable by transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from router import devtools
from router.devtools import write_tiny_model

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def test_required_files_present_and_small(tiny: Path) -> None:
    for name in FILES:
        assert (tiny / name).is_file(), name
    assert (tiny / "model.safetensors").stat().st_size < 8 * 2**20


def test_same_seed_same_bytes_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again", seed=0)
    for name in FILES:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name

    other = write_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_safetensors_metadata_is_fixed(tiny: Path) -> None:
    raw = (tiny / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"}
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


def test_existing_model_is_not_rewritten(tiny: Path) -> None:
    before = {name: (tiny / name).stat().st_mtime_ns for name in FILES}
    assert write_tiny_model(tiny) == tiny
    assert {name: (tiny / name).stat().st_mtime_ns for name in FILES} == before


def test_foreign_directory_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_tiny_model(target)
    assert (target / "notes.txt").exists()

    write_tiny_model(target, overwrite=True)
    assert not (target / "notes.txt").exists()
    assert all((target / name).is_file() for name in FILES)
    # No staging directories left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]

    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FileExistsError):
        write_tiny_model(file)


def test_stale_tiny_model_is_rewritten(tiny: Path, tmp_path: Path) -> None:
    target = write_tiny_model(tmp_path / "m", seed=3)
    weights = (target / "model.safetensors").read_bytes()
    # Another seed of our own model: rewritten without asking.
    write_tiny_model(target, seed=0)
    assert (target / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    # A directory from an older recipe: rewritten too.
    marker = target / devtools._MARKER
    marker.write_text(json.dumps({"format": 0, "seed": 3}))
    (target / "model.safetensors").write_bytes(b"old")
    write_tiny_model(target, seed=3)
    assert (target / "model.safetensors").read_bytes() == weights
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_config_values(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    generation = json.loads((tiny / "generation_config.json").read_text())
    tokenizer_config = json.loads((tiny / "tokenizer_config.json").read_text())
    vocab = json.loads((tiny / "tokenizer.json").read_text())

    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 256
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert config["max_position_embeddings"] == 4096
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == devtools.VOCAB_SIZE

    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert config["eos_token_id"] == generation["eos_token_id"] == [ids["<|im_end|>"], ids["</s>"]]
    assert config["bos_token_id"] == generation["bos_token_id"] == ids["<s>"]
    assert config["pad_token_id"] == ids["<pad>"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "chat_template" in tokenizer_config


def test_tokenizer_round_trips(tiny: Path, hf_tokenizer) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert raw.get_vocab_size() == devtools.VOCAB_SIZE
    for text in ["The llama is gentle.", "  two  spaces\n\tand tabs", "héllo wörld 🦙 日本", ""]:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert raw.decode(ids) == text
        assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    # BPE learned the corpus: common words are single tokens.
    assert len(raw.encode(" the llama", add_special_tokens=False).ids) == 2
    # Plain prompts get one BOS; special tokens are single ids.
    assert hf_tokenizer("Hi")["input_ids"][0] == hf_tokenizer.bos_token_id
    for token in ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<tool_call>"):
        assert len(raw.encode(token, add_special_tokens=False).ids) == 1, token
    assert hf_tokenizer.eos_token_id == raw.token_to_id("<|im_end|>")
    assert hf_tokenizer.pad_token_id == raw.token_to_id("<pad>")


def test_chat_template(hf_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Lima?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}
            ],
        },
        {"role": "tool", "content": "22 C"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    text = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\n22 C<|im_end|>\n" in text
    assert "<|im_start|>user\nThanks!<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")

    plain = hf_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert plain == "<s><|im_start|>user\nWeather in Lima?<|im_end|>\n"
    # The rendered prompt already starts with BOS; it must not get a second one.
    ids = hf_tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [hf_tokenizer.bos_token_id, hf_tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_transformers_forward_pass(tiny: Path, hf_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    assert model.dtype == torch.float16
    assert model.config.head_dim == 64
    ids = hf_tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], devtools.VOCAB_SIZE)
    assert torch.isfinite(logits.float()).all()


def test_global_rng_untouched(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    write_tiny_model(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_module_imports_without_heavy_dependencies() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'tokenizers', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "import router.devtools\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
