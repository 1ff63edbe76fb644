"""Vision-language policies: prompts that carry an image, their pixel inputs, and the positions and
logits rules that keep generation and training on the same numbers.

- A vision-language model (VLM) directory is loaded by `t2po.models.load_model` with its processor
  (tokenizer + image processor + chat template, `load_processor`); the returned tokenizer carries it
  as `tokenizer.processor`, so everything that holds the tokenizer can render images.
- `build_image_prompt`: the environment's prompt text becomes one user message whose content has an
  image part where the text has its `<image>` placeholder; the processor renders it with its chat
  template and expands the image into its placeholder tokens. The ids it returns are the prompt ids
  (never re-tokenized later); the other tensors it returns (`pixel_values`, `image_grid_thw` for
  Qwen2-VL / Qwen2.5-VL, `pixel_attention_mask` for Idefics3 / SmolVLM, ...) are the prompt's *pixel
  inputs*, kept on the CPU with the step sample so that the trainer's forward pass sees exactly the
  pixels the engine saw.
- `collate_pixel_inputs`: the pixel inputs of a batch, in row order (packed patches are concatenated,
  per-row image stacks are zero-padded: Idefics3 drops all-zero images).
- `position_ids`: the positions of a padded batch. Qwen2-VL-class models use multimodal RoPE (M-RoPE:
  image tokens get temporal/height/width positions, text after the image continues from their
  maximum); the model's own `get_rope_index` computes them from the ids, the image grids and the
  attention mask, so left padding (engine) and right padding (trainer) give every real token the
  same position. Other models use 1-D positions counted over real tokens. Positions are always passed
  explicitly, so the model's cached `rope_deltas` state never matters.
- `placeholder_token_ids`: the image (and video) placeholder tokens. The model replaces them by image
  features, so a response must never contain one; the engine and the trainer both give them
  probability 0 (logit -inf), which keeps the recomputed log-probs equal to the engine's.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

IMAGE_PLACEHOLDER = "<image>"  # what environments write where the picture goes
# processor outputs that are not pixel inputs (token-level tensors are rebuilt from the prompt ids)
_TEXT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}

PixelInputs = dict[str, torch.Tensor]

#: what counts as a vision-language model, for error messages
VLM_EXAMPLES = ("a local Qwen2-VL / Qwen2.5-VL / Idefics3 (SmolVLM) directory, or tiny-vlm (a tiny "
                "random VLM for CPU smoke runs)")
NEEDS_VLM = (f"image observations (observation_mode=image or both) need a vision-language model ({VLM_EXAMPLES}), and "
             "this model is text-only: use such a model (model.path=... for t2po train, MODEL for t2po eval), or "
             "observation_mode=text")


def is_vision_language(model: torch.nn.Module) -> bool:
    """True for a vision-language model (plain or wrapped by peft)."""
    return getattr(_base(model).config, "vision_config", None) is not None


def load_processor(directory) -> Any:
    """The processor of a VLM directory, offline. Processors of the Qwen2-VL family also declare a
    video processor, which transformers builds only with torchvision installed; t2po sends images
    only, so such a processor is built without its video half (same class otherwise), with or
    without torchvision."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    name = _processor_class_name(directory)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return AutoProcessor.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    template = tokenizer.chat_template
    if (Path(directory) / "chat_template.jinja").is_file():
        template = (Path(directory) / "chat_template.jinja").read_text()
    elif (Path(directory) / "chat_template.json").is_file():  # the older processor format
        template = json.loads((Path(directory) / "chat_template.json").read_text())["chat_template"]
    return image_only_processor_class(cls)(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def build_image_prompt(tokenizer: Any, text: str, image: Any,
                       max_prompt_tokens: int | None = None) -> tuple[list[int], PixelInputs]:
    """Prompt ids and pixel inputs of one user message that shows `image` (a PIL image) where `text`
    has its `<image>` placeholder (at the start when it has none). Image prompts are never cut: a
    prompt longer than `max_prompt_tokens` is an error (cutting could split the image's tokens)."""
    processor = getattr(tokenizer, "processor", None)  # attached by t2po.models.load_model to a VLM's tokenizer
    if processor is None:
        raise ValueError(NEEDS_VLM)
    before, sep, after = text.partition(IMAGE_PLACEHOLDER)
    if not sep:
        before, after = "", text
    content: list[dict[str, Any]] = []
    if before:
        content.append({"type": "text", "text": before})
    content.append({"type": "image"})
    if after:
        content.append({"type": "text", "text": after})
    rendered = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    batch = processor(text=[rendered], images=[image.convert("RGB")], return_tensors="pt")
    ids = [int(t) for t in batch["input_ids"][0]]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise ValueError(
            f"an image prompt has {len(ids)} tokens, more than max_prompt_tokens={max_prompt_tokens}; image prompts "
            "are not cut (a cut could split the image's tokens). Raise rollout.max_prompt_tokens or shorten the prompt "
            "(env.options.history_length)"
        )
    pixels = {k: v.detach().cpu() for k, v in batch.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
    return ids, pixels


def collate_pixel_inputs(rows: list[PixelInputs | None],
                         device: torch.device | str | None = None) -> PixelInputs | None:
    """The pixel inputs of a batch whose rows are `rows` (None: a row without an image), in row order.
    Qwen2-VL-style inputs (`image_grid_thw` present) are packed patches: concatenated. Others carry
    a per-row stack of images (batch dimension 1): padded with all-zero images to the largest stack
    (Idefics3 drops all-zero images), rows without an image get zeros. None when no row has one."""
    present = [r for r in rows if r]
    if not present:
        return None
    keys = sorted(present[0])
    if any(sorted(r) != keys for r in present):
        raise ValueError("pixel inputs of one batch must have the same keys; got "
                         f"{sorted({tuple(sorted(r)) for r in present})}")
    out: PixelInputs = {}
    if "image_grid_thw" in keys:
        for k in keys:
            out[k] = torch.cat([r[k] for r in present], dim=0)
    else:
        for k in keys:
            ref = present[0][k]
            if ref.dim() < 2 or ref.shape[0] != 1:
                raise ValueError(f"pixel input {k!r} has shape {tuple(ref.shape)}; expected a batch dimension of 1 per "
                                 "prompt")
            n = max(r[k].shape[1] for r in present)
            tail = ref.shape[2:]
            if any(r[k].shape[2:] != tail for r in present):
                raise ValueError(f"pixel input {k!r}: images of one batch must have one size; got "
                                 f"{sorted({tuple(r[k].shape) for r in present})}")
            padded = []
            for r in rows:
                block = ref.new_zeros((1, n, *tail))
                if r:
                    block[:, : r[k].shape[1]] = r[k]
                padded.append(block)
            out[k] = torch.cat(padded, dim=0)
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def position_ids(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixels: PixelInputs | None) -> torch.Tensor:
    """Positions of a padded batch: [3, B, L] M-RoPE positions for Qwen2-VL-class models when the batch
    has images, else [B, L] positions counted over real tokens (pads get 0)."""
    rope_index = getattr(getattr(_base(model), "model", None), "get_rope_index", None)
    if rope_index is not None and pixels is not None and "image_grid_thw" in pixels:
        image_token_id = _base(model).config.image_token_id
        positions, _ = rope_index(input_ids=input_ids, mm_token_type_ids=(input_ids == image_token_id).int(),
                                  image_grid_thw=pixels["image_grid_thw"], attention_mask=attention_mask)
        return positions
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def placeholder_token_ids(model: torch.nn.Module) -> list[int]:
    """Ids the model replaces by image or video features (never part of a response)."""
    config = _base(model).config
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def multimodal_body(model: torch.nn.Module) -> torch.nn.Module:
    """The module that turns ids + pixel inputs into the last hidden states (the LM head excluded)."""
    return _base(model).model


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _processor_class_name(directory) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(directory) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("processor_class")
            if value:
                return value
    return None


def image_only_processor_class(cls: type) -> type:
    """`cls` without its video processor argument; same class name, so that it saves as `cls`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,),
                {"__init__": __init__, "__doc__": f"{cls.__name__} for images only (t2po sends no videos)."})
