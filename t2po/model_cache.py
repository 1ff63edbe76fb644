"""The named models t2po builds into its cache on first use, without torch (the API evaluation path and
`t2po.checkpoints` read these names): `DEFAULT_MODEL` (the embedded SmolLM2-135M-Instruct, converted by
`t2po.models.smollm2_directory`) and `TINY_VLM` (the tiny random VLM, built by `t2po.tiny_models`), the cache
root they live under and the one way a model folder is written into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_VLM = "tiny-vlm"

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


def build_cached_directory(target: Path, build: Callable[[Path], object]) -> Path:
    """`target` (a model folder in the cache), built by `build(folder)` on first use: into a private
    staging folder, then renamed, so a half-built folder never appears and concurrent first uses
    (test workers, ranks) do not collide. The cache's one way of writing a model folder."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
