"""Supervised fine-tuning on multi-turn agent conversations (cold start before RL, docs/method.md §5).

A conversation is one episode: a list of steps, each a (prompt text, response text) pair where the
prompt is exactly what the rollout loop renders for that step (task, history, observation), so SFT
sees the same tokens as RL. The loss is on the assistant tokens only (the response and the
end-of-turn token); prompt tokens are masked out. A step of an environment in image mode also keeps
its observation image (a PNG data URL in the JSON files); a vision-language model's processor renders
it exactly as at rollout time (`t2po.rollout.build_prompt`), and its pixel inputs go into the forward
pass.

    convs = play_expert_episodes(env, seeds=range(32))
    sft_train(model, tokenizer, convs, epochs=2, lr=2e-4)

`t2po sft DATA --out DIR` (`main`) trains on the conversations `t2po rft collect` kept and writes a model
folder that `t2po train model.path=DIR` starts from.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from t2po.bounds import BATCH_SIZE, SEED, bounded
from t2po.envs.base import BatchEnv
from t2po.errors import InvalidInput, UserError
from t2po.forward import FrozenTrunk, forward_micro_batch, make_micro_batch, pack_by_length
from t2po.paths import new_folder
from t2po.policies import ExpertPolicy
from t2po.rollout import RolloutSettings, build_prompt, collect_rollouts


@dataclass
class Conversation:
    env: str
    seed: int
    steps: list[dict]  # [{"prompt": str, "response": str, "response_ids": list[int] | None, "image": PIL image | None}]
    reward: float
    won: bool
    metrics: dict = field(default_factory=dict)
    source: str = "expert"

    def to_json(self) -> dict:
        steps = [{**s, "image": _image_to_url(s["image"])} if s.get("image") is not None else s for s in self.steps]
        return {"env": self.env, "seed": self.seed, "steps": steps, "reward": self.reward, "won": self.won,
                "metrics": self.metrics, "source": self.source}

    def messages(self) -> list[list[dict]]:
        """The chat messages of each step, as the rollout renders them (one user turn + the answer)."""
        return [[{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["response"]}]
                for s in self.steps]


def play_expert_episodes(env: BatchEnv, seeds: Iterable[int], max_turns: int | None = None) -> list[Conversation]:
    """Play `env`'s expert (`expert_response`) on the given task seeds through the rollout loop
    (`ExpertPolicy`) and record the conversations. A demonstration ends where the expert has no move."""
    seeds = list(seeds)
    result = collect_rollouts(ExpertPolicy(env), env, seeds, RolloutSettings(max_turns=max_turns))
    if seeds and not result.samples:
        raise InvalidInput(f"Environment {env.name!r} gave no expert move on seeds "
                           f"{seeds[:8]}{'...' if len(seeds) > 8 else ''}; "
                         "use `t2po rft collect` with a model instead.")
    convs = []
    for ep in result.episodes:
        steps = [{"prompt": t.prompt_text, "response": t.response_text,
                  **({"image": t.image} if t.image is not None else {})}
                 for t in ep.traces]
        convs.append(Conversation(env.name, ep.seed, steps, float(sum(s.env_reward for s in ep.samples)),
                                  ep.won, ep.metrics))
    return convs


def save_conversations(convs: list[Conversation], path: Path) -> None:
    """JSONL (one conversation per line); a `.parquet` path writes the same rows with pyarrow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [c.to_json() for c in convs]
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{**r, "steps": json.dumps(r["steps"]),
                                       "metrics": json.dumps(r["metrics"])} for r in rows])
        pq.write_table(table, tmp)
    else:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def load_conversations(path: Path) -> list[Conversation]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No conversation file at {path}; make one with `t2po rft collect ENV --out {path}`.")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        rows = [{**r, "steps": json.loads(r["steps"]), "metrics": json.loads(r["metrics"])} for r in rows]
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise InvalidInput(f"{path}, line {number}: not a JSON object ({e}); expected one conversation per "
                                   "line, "
                                 "as written by `t2po rft collect`.") from None
    out = []
    for k, r in enumerate(rows):
        if not isinstance(r, dict) or "steps" not in r or not isinstance(r["steps"], list):
            raise InvalidInput(f"{path}: row {k} has no 'steps' list; expected rows written by `t2po rft collect`.")
        for step in r["steps"]:
            if isinstance(step.get("image"), str):
                step["image"] = _image_from_url(step["image"])
        out.append(Conversation(r.get("env", ""), int(r.get("seed", -1)), r["steps"], float(r.get("reward", 0.0)),
                                bool(r.get("won", False)), r.get("metrics", {}), r.get("source", "expert")))
    return out


def tokenize_conversations(convs: list[Conversation], tokenizer: Any,
                           max_prompt_tokens: int | None = None) -> list[tuple]:
    """(prompt ids, response ids) per step, plus the pixel inputs for a step with an image. Model
    episodes carry the exact ids the engine saw and produced (`prompt_ids`, `response_ids`); expert
    steps are rendered exactly as at rollout time (same chat template; with an image, the VLM's
    processor) and their response text is tokenized with the end-of-turn token appended."""
    eos = tokenizer.eos_token_id
    examples = []
    for conv in convs:
        for step in conv.steps:
            pixels = None
            if step.get("image") is not None:
                prompt_ids, pixels, _ = build_prompt(tokenizer, step["prompt"], step["image"], max_prompt_tokens)
                if step.get("prompt_ids") and step["prompt_ids"] != prompt_ids:
                    raise InvalidInput(f"{conv.env} seed {conv.seed}: the recorded prompt ids differ from the image "
                                       "prompt this model's processor renders; collect the episodes with this model")
            else:
                prompt_ids = step.get("prompt_ids") or build_prompt(tokenizer, step["prompt"], None,
                                                                    max_prompt_tokens)[0]
            ids = step.get("response_ids")
            if ids is None:
                ids = tokenizer.encode(step["response"], add_special_tokens=False) + [eos]
            examples.append((prompt_ids, list(ids)) if pixels is None else (prompt_ids, list(ids), pixels))
    return examples


def sft_steps(num_examples: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps `sft_train` takes."""
    return epochs * math.ceil(num_examples / batch_size)


def sft_train(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[tuple],
    epochs: int = 2,
    lr: float = 2e-4,
    batch_size: int = 8,
    micro_batch_tokens: int = 4096,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    progress: Any = None,
) -> list[float]:
    """Minimise the mean negative log-likelihood of the response tokens (assistant tokens only).
    `examples` are (prompt ids, response ids[, pixel inputs]). Returns the mean loss of each epoch.
    `progress` (a `t2po.progress.Progress` over `sft_steps(...)` optimizer steps) advances per step."""
    if not examples:
        raise InvalidInput("No SFT examples: the conversation set is empty.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [e[0] for e in examples]
    responses = [e[1] for e in examples]
    pixels = [e[2] if len(e) > 2 else None for e in examples]
    total_steps = sft_steps(len(examples), epochs, batch_size)
    step = 0
    epoch_losses = []
    device = params[0].device  # the micro-batches go where the model is
    trunk = _frozen_trunk(model, prompts, responses, epochs)
    model.train()
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            n_tokens = sum(len(responses[i]) for i in batch)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            lengths = [len(prompts[i]) + len(responses[i]) for i in batch]
            for group in pack_by_length(lengths, micro_batch_tokens):
                mb = make_micro_batch([batch[g] for g in group], prompts, responses, pad, pixels).to(device)
                out = forward_micro_batch(model, mb, trunk=trunk)
                loss = -(out["logp"] * mb.response_mask).sum() / max(n_tokens, 1)
                loss.backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            # cosine decay keeps the last steps gentle
            for g in optimizer.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))
            optimizer.step()
            step += 1
            losses.append(loss_sum)
            if progress is not None:
                progress.update(1, note=f"epoch {epoch + 1}/{epochs}, loss {loss_sum:.3f}")
        epoch_losses.append(float(sum(losses) / len(losses)))
        if log:
            log({"sft/epoch": epoch + 1, "sft/loss": epoch_losses[-1]})
    model.eval()
    return epoch_losses


# the most memory the recorded trunk states may take (e.g. 10k examples of 200 tokens of a 576-wide model in bf16: 2.3
# GB)
TRUNK_BYTES = 2 * 2**30


def _frozen_trunk(model: torch.nn.Module, prompts: list, responses: list, epochs: int) -> FrozenTrunk | None:
    """A `t2po.forward.FrozenTrunk` for SFT under LoRA on the last layers: the first epoch records the
    states entering the first trainable layer, later epochs start their passes there (the main job's
    warm-up: 3 epochs, 13 s -> 10 s in consecutive runs). None for one epoch, nothing to skip, a sharded model
    (FSDP2 needs the same collectives on every rank), or states over `TRUNK_BYTES`."""
    if epochs < 2 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    layer = FrozenTrunk.first_trainable_layer(model)
    if not layer:
        return None
    config = model.config.get_text_config()
    size = sum(len(p) + len(r)
               for p, r in zip(prompts, responses)) * config.hidden_size * next(model.parameters()).element_size()
    return FrozenTrunk(layer) if size <= TRUNK_BYTES else None


def _image_to_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_from_url(url: str) -> Any:
    from PIL import Image

    head, _, data = url.partition(",")
    if not head.startswith("data:image/"):
        raise InvalidInput("a conversation step's image must be a data URL (data:image/png;base64,...), got "
                           f"{url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def sft_model_folder(data: Path, model_path: str | None, out: Path, epochs: int, lr: float, lora: bool, batch_size: int,
                     seed: int) -> dict:
    """SFT on collected conversations; writes a full model folder (LoRA merged) that `t2po train
    model.path=OUT` starts from."""
    import torch

    from t2po.checkpoints import atomic_dir
    from t2po.models import load_model, lora_targets, save_tokenizer

    convs = load_conversations(data)
    if not convs:
        raise UserError(f"{data} holds no conversations: collect some with `t2po rft collect`.")
    torch.manual_seed(seed)
    model, tokenizer = load_model(model_path)
    examples = tokenize_conversations(convs, tokenizer)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 **lora_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"], None)))
    losses = sft_train(model, tokenizer, examples, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    if lora:
        model = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        (tmp / "sft.json").write_text(json.dumps({"data": str(data), "base": model_path, "examples": len(examples),
                                                  "conversations": len(convs), "losses": losses}, indent=1))
    return {"out": str(out), "examples": len(examples), "losses": losses}


def main(argv: list[str] | None = None) -> int:
    """`t2po sft DATA --out DIR`."""
    parser = argparse.ArgumentParser(prog="t2po sft",
            description="Multi-turn SFT on collected conversations (loss on assistant tokens only).")
    parser.add_argument("data", type=Path, help="conversations from `t2po rft collect` (.jsonl or .parquet)")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="output model folder (safetensors): a new or empty folder")
    parser.add_argument("--epochs", type=bounded(1, 1000), default=2,
                        help="passes over the data, 1 to 1000 (default 2)")
    parser.add_argument("--lr", type=bounded(1e-12, 1.0, float), default=2e-4,
                        help="learning rate in (0, 1] (default 2e-4)")
    parser.add_argument("--batch-size", type=BATCH_SIZE, default=8,
                        help="samples per optimizer step, 1 to 4096 (default 8)")
    parser.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    parser.add_argument("--seed", type=SEED, default=0)
    ns = parser.parse_args(argv)
    try:
        new_folder(ns.out, "--out")  # the path rule (t2po/paths.py): a new or empty folder, never overwritten
        stats = sft_model_folder(ns.data, ns.model, Path(ns.out), ns.epochs, ns.lr, not ns.full, ns.batch_size, ns.seed)
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"t2po sft: {e}", file=sys.stderr)
        return 2
    print(f"SFT loss {stats['losses'][0]:.3f} -> {stats['losses'][-1]:.3f} on {stats['examples']} steps; model in "
          f"{stats['out']}")
    print(f"next: t2po train model.path={stats['out']}")
    return 0
