"""Tiny random models for tests and CPU smoke runs, built offline through the same classes as real ones.

- `build_tiny_model(out_dir)`: a tiny Llama-architecture causal LM with a byte-level BPE tokenizer
  trained on a built-in corpus and SmolLM2's chat template (so prompts render as the real model's);
- `build_tiny_vlm(out_dir)`: a tiny randomly initialised Qwen2-VL with its processor;
- `tiny_vlm_directory()`: that VLM built once into the cache (`model.path=tiny-vlm`, see `t2po.models`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from t2po.model_cache import SMOLLM2_CHAT_TEMPLATE, build_cached_directory, cache_root

_TINY_VLM_VERSION = 1  # bump when build_tiny_vlm's output changes, so that caches are rebuilt


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
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return _save_seeded(LlamaForCausalLM, config, tokenizer, tokenizer, out_dir, seed)


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
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from t2po.vlm import image_only_processor_class

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tiny_tokenizer(vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *vision_tokens],
                                pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    processor = image_only_processor_class(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                             chat_template=QWEN2_VL_CHAT_TEMPLATE)
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // num_heads
    # temporal, height, width; sums to head_dim / 2
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
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
    return _save_seeded(Qwen2VLForConditionalGeneration, config, tokenizer, processor, out_dir, seed)


def _save_seeded(model_class, config, tokenizer, saver, out_dir: str | os.PathLike, seed: int) -> Path:
    """Initialise `model_class(config)` from `seed` and save it with `saver` (tokenizer or processor)
    as a Hugging Face model directory."""
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    saver.save_pretrained(out)
    return out


def tiny_vlm_directory() -> Path:
    """The cached tiny random VLM (`build_tiny_vlm`), built on first use, for the CPU image-mode
    presets and `t2po eval ENV tiny-vlm`."""
    return build_cached_directory(cache_root() / "models" / f"tiny-vlm-v{_TINY_VLM_VERSION}", build_tiny_vlm)


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
