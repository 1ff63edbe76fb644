"""`t2po export RUN_OR_CHECKPOINT --out DIR`: a trained policy as a plain Hugging Face model folder.

    t2po export runs/sokoban-t2po-20260101-120000 --out exported/    # the run's latest checkpoint
    t2po export runs/.../checkpoints/iter_000005 --out exported/      # one checkpoint

DIR holds the merged model (LoRA merged into its base, or the full fine-tuned weights) as safetensors
with `config.json`, `generation_config.json` and the tokenizer with its chat template, so that
`AutoModelForCausalLM.from_pretrained(DIR)` loads it (tests/commands/test_export.py), and it is the standard
layout that vLLM (`vllm serve DIR`) and conversion tools (llama.cpp's convert_hf_to_gguf.py, the
Hub) read. For a LoRA checkpoint,
`DIR/adapter/` is the adapter alone, its `adapter_config.json` naming the base it was trained on (the
run's `warmup_model/` when a warm-up ran), for `AutoPeftModelForCausalLM.from_pretrained(DIR/adapter)`.
`DIR/export.json` records what was exported from where. The folder is written to `DIR.tmp` and
renamed when complete; an existing non-empty DIR is never overwritten.

The weights are those `t2po eval` and `t2po serve` load (`t2po.policy_source.resolve_policy`), in the
dtype the run trained in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from t2po.errors import UserError


def export(source_path: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None) -> Path:
    """Write the merged model (and the adapter of a LoRA checkpoint) to `out`; returns `out`."""
    from t2po.checkpoints import atomic_dir, point_adapter_at
    from t2po.policy_source import locate_policy, resolve_policy
    from t2po.models import model_directory, resolve_dtype, save_tokenizer
    from t2po.progress import silence_library_progress

    from t2po.paths import new_folder

    out = new_folder(out, "--out")  # the path rule (t2po/paths.py): a new or empty folder outside any run
    source = locate_policy(source_path)
    run_dtype = source.run_config.model.dtype if source.run_config is not None else None
    torch_dtype = resolve_dtype(dtype or run_dtype or "float32")  # "auto": what the run trained in on this hardware
    dtype = str(torch_dtype).removeprefix("torch.")
    silence_library_progress()
    model, tokenizer, description = resolve_policy(source_path, dtype=torch_dtype)
    # generation stops where the chat template ends a turn, also outside t2po (vLLM, pipelines)
    gen = model.generation_config
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(gen, key, None) is None and getattr(tokenizer, key, None) is not None:
            setattr(gen, key, getattr(tokenizer, key))
    info = {"source": str(Path(source_path).resolve()) if source_path else None, "policy": description, "dtype": dtype}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)  # with the chat template (a VLM: its whole processor)
        if source.checkpoint is not None:
            base = str(model_directory(source.base))
            info.update({"checkpoint": str(source.checkpoint), "base": base,
                         "iteration": json.loads((source.checkpoint / "trainer_state.json").read_text()).get("iteration")})
            if (source.checkpoint / "adapter").is_dir():
                shutil.copytree(source.checkpoint / "adapter", tmp / "adapter")
                point_adapter_at(tmp / "adapter", base)
                info["adapter"] = "adapter/"
        (tmp / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2po export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder (its latest checkpoint), a checkpoint folder, or a model folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new model folder")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (default: the run's model.dtype; auto = bfloat16 where the hardware has it)")
    ns = parser.parse_args(argv)
    try:
        out = export(ns.model, ns.out, ns.dtype)
    except (FileNotFoundError, FileExistsError, ValueError, UserError) as e:
        print(f"t2po export: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "export.json").read_text())
    print(f"exported {info['policy']} -> {out}")
    print(f"  AutoModelForCausalLM.from_pretrained({str(out)!r})   # merged; also: vllm serve {out}")
    if "adapter" in info:
        print(f"  AutoPeftModelForCausalLM.from_pretrained({str(out / 'adapter')!r})   # the LoRA adapter on {info['base']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
