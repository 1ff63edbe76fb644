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
The embedded model's base is named by its Hub id, `HuggingFaceTB/SmolLM2-135M-Instruct`, not by the
cache folder on this machine (which `export.json` and `DIR/README.md` record): the adapter was
trained on that model de-quantized from a Q4_1 GGUF, whose weights differ slightly from the Hub's.
`DIR/export.json` records what was exported from where; `DIR/README.md` says how to load it and how
to decode with TTI outside t2po (`t2po.engines.hf.TTILogitsProcessor` for transformers,
`t2po.engines.vllm_engine.TTILogitsProcessor` for vLLM). Files are world-readable (0644, folders
0755). The folder is written to `DIR.tmp` and renamed when complete; an existing non-empty DIR is
never overwritten.

The weights are those `t2po eval` and `t2po serve` load (`t2po.locate.load_local_model`), in the
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
    from t2po.locate import load_local_model, locate_model
    from t2po.models import model_directory, public_model_id, resolve_dtype, save_tokenizer
    from t2po.progress import silence_library_progress

    from t2po.paths import new_folder

    out = new_folder(out, "--out")  # the path rule (t2po/paths.py): a new or empty folder outside any run
    source = locate_model(source_path)
    run_dtype = source.run_config.model.dtype if source.run_config is not None else None
    torch_dtype = resolve_dtype(dtype or run_dtype or "float32")  # "auto": what the run trained in on this hardware
    dtype = str(torch_dtype).removeprefix("torch.")
    silence_library_progress()
    model, tokenizer, description = load_local_model(source_path, dtype=torch_dtype)
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
            local = str(model_directory(source.base))
            base = public_model_id(local) or local
            state = json.loads((source.checkpoint / "trainer_state.json").read_text())
            info.update({"checkpoint": str(source.checkpoint), "base": base, "iteration": state.get("iteration")})
            if base != local:
                info["base_local_folder"] = local
            if (source.checkpoint / "adapter").is_dir():
                shutil.copytree(source.checkpoint / "adapter", tmp / "adapter")
                point_adapter_at(tmp / "adapter", base)
                info["adapter"] = "adapter/"
        (tmp / "export.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(_readme(info, tmp.name.removesuffix(".tmp")))
        for path in [tmp, *tmp.rglob("*")]:  # atomic writes create 0600 files: make the folder shareable
            path.chmod(0o755 if path.is_dir() else 0o644)
    return out


def _readme(info: dict, name: str) -> str:
    """DIR/README.md: what the folder holds and how to use it without t2po, TTI included."""
    from t2po.models import EMBEDDED_MODEL_SOURCE

    lines = [f"# {name}", "", f"Exported by `t2po export` from {info['policy']} ({info['dtype']}).", "",
             "The merged model: `AutoModelForCausalLM.from_pretrained(\"DIR\")`, or `vllm serve DIR`."]
    if "adapter" in info:
        lines += ["", "The LoRA adapter alone: `AutoPeftModelForCausalLM.from_pretrained(\"DIR/adapter\")`, on "
                      f"`{info['base']}`."]
    if "base_local_folder" in info:
        lines += ["", f"The adapter was trained on {EMBEDDED_MODEL_SOURCE} (on the exporting machine: "
                      f"`{info['base_local_folder']}`);",
                  "its weights differ slightly from the Hub's bfloat16 ones, so on the Hub model the adapter's outputs "
                  "differ slightly."]
    lines += ["", "## Decoding with the thinking intervention (TTI)", "",
              "t2po's policy forces the end of thinking (`</think>`) inside decoding; plain `generate` does not. To "
              "decode as t2po does:", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList",
              "from t2po.engines.base import InterventionConfig", "from t2po.engines.hf import TTILogitsProcessor", "",
              "model, tok = AutoModelForCausalLM.from_pretrained(\"DIR\"), AutoTokenizer.from_pretrained(\"DIR\")",
              "tti = TTILogitsProcessor(tok, InterventionConfig(budget=450))  # the run's rollout.tti settings",
              "out = model.generate(ids, logits_processor=LogitsProcessorList([tti]), do_sample=True, top_k=0)", "```",
              "",
              "With vLLM: `vllm.LLM(model=\"DIR\", logits_processors=[t2po.engines.vllm_engine.TTILogitsProcessor])` "
              "and each request's",
              "`SamplingParams` from `t2po.engines.vllm_engine.vllm_request` (or `t2po eval` "
              "/ `t2po serve` on this folder).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2po export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (its latest checkpoint), a checkpoint folder, or a model folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new model folder")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (default: the run's model.dtype; auto = bfloat16 where the hardware has "
                             "it)")
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
        print(f"  AutoPeftModelForCausalLM.from_pretrained({str(out / 'adapter')!r})   # the LoRA adapter on "
              f"{info['base']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
