"""t2po/checkpoints.py, the one home of the run and checkpoint layout: save/load round trips (LoRA and
full weights, optimizer, critic, RNG, trainer state), which checkpoint is the latest, pruning, atomic
writes, and resolving a model argument (run folder, checkpoint, Hugging Face directory, bad path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from t2po.checkpoints import (Checkpointer, atomic_dir, atomic_write_text, checkpoint_dir, latest_checkpoint,
                              load_checkpoint, prune_checkpoints,
                              save_checkpoint)
from t2po.config import ModelConfig
from t2po.locate import load_local_model, locate_model
from t2po.models import add_lora, load_model


def _policy(model_dir: Path, lora: bool):
    """A fresh tiny policy as the trainer builds it (LoRA adapters or all weights), its AdamW and a critic head."""
    model = load_model(model_dir)[0]
    if lora:
        model = add_lora(model, ModelConfig(lora_rank=4, lora_alpha=8))
    params = [p for p in model.parameters() if p.requires_grad]
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    return model, torch.optim.AdamW(params + list(value_head.parameters()), lr=1e-2), value_head


def _train_step(model, optimizer, value_head) -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    (out.loss + value_head(out.hidden_states[-1]).pow(2).mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _trainable(model, value_head) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"value_head.{n}": p.detach().clone() for n, p in value_head.named_parameters()})
    return state


def _optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    return {f"{pid}.{k}": v for pid, s in optimizer.state_dict()["state"].items() for k, v in s.items()
            if torch.is_tensor(v)}


@pytest.mark.parametrize("lora", [True, False])
def test_save_then_load_restores_weights_optimizer_rng_and_state(tiny_model_dir, tmp_path, lora):
    model, optimizer, value_head = _policy(tiny_model_dir, lora)
    _train_step(model, optimizer, value_head)  # non-zero LoRA B, optimizer moments, a moved critic
    ckpt = save_checkpoint(tmp_path / "checkpoints", 3, model, optimizer, {"scheduler_step": 7},
                           value_head=value_head, lora=lora)
    assert ckpt == checkpoint_dir(tmp_path / "checkpoints", 3) and (ckpt / ("adapter" if lora else "model")).is_dir()
    saved, saved_rng = _trainable(model, value_head), torch.get_rng_state()
    torch.rand(10)  # the RNG moves on after the save

    fresh, fresh_optimizer, fresh_head = _policy(tiny_model_dir, lora)
    before = _trainable(fresh, fresh_head)
    assert any(not torch.equal(before[k], saved[k])
               for k in saved), "the fresh policy must differ, or the test shows nothing"
    state = load_checkpoint(ckpt, fresh, fresh_optimizer, fresh_head, lora=lora)
    assert state == {"scheduler_step": 7, "iteration": 3}
    loaded = _trainable(fresh, fresh_head)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    a, b = _optimizer_tensors(optimizer), _optimizer_tensors(fresh_optimizer)
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    # JSON: betas come back a list
    groups = [json.loads(json.dumps(o.state_dict()["param_groups"])) for o in (optimizer, fresh_optimizer)]
    assert groups[0] == groups[1]
    assert torch.equal(torch.get_rng_state(), saved_rng), "the RNG state is the one at the save"


def test_checkpointer_names_its_base_and_loads_the_newest_readable_one(tiny_model_dir, tmp_path):
    """`Checkpointer`: a saved checkpoint names the model folder its adapter applies to; `load_newest` passes
    over a newer checkpoint whose optimizer file was cut short (named in a note) and loads the one before."""
    model, optimizer, _ = _policy(tiny_model_dir, lora=True)
    notes = []
    checkpoints = Checkpointer(tmp_path, notes.append)
    assert checkpoints.load_newest(model, optimizer, None, lora=True) is None and notes == []
    _train_step(model, optimizer, torch.nn.Linear(model.config.hidden_size, 1))
    first = checkpoints.save(1, model, optimizer, {"scheduler_step": 1}, base_path=str(tiny_model_dir),
                             lora=True, keep=3)
    adapter = json.loads((first / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)
    newest = checkpoints.save(2, model, optimizer, {"scheduler_step": 2}, base_path=str(tiny_model_dir),
                              lora=True, keep=3)
    assert checkpoints.complete() == [newest, first] and checkpoints.latest() == newest
    damaged = newest / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    fresh, fresh_optimizer, _ = _policy(tiny_model_dir, lora=True)
    ckpt, state = checkpoints.load_newest(fresh, fresh_optimizer, None, lora=True)
    assert ckpt == first and state == {"scheduler_step": 1, "iteration": 1}
    assert len(notes) == 1 and "skipped checkpoint" in notes[0] and "optimizer.safetensors" in notes[0]


def test_saving_prunes_to_keep_and_leaves_no_tmp_folder(tiny_model_dir, tmp_path):
    model, optimizer, _ = _policy(tiny_model_dir, lora=True)
    root = tmp_path / "checkpoints"
    for it in (1, 2, 3, 4):
        save_checkpoint(root, it, model, optimizer, {}, lora=True, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000003", "iter_000004"]
    assert latest_checkpoint(root) == root / "iter_000004"


def _fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    """A checkpoint folder whose files read back (`t2po.checkpoints.checkpoint_problem`) but hold no real policy."""
    from safetensors.torch import save_file

    ckpt = root / name
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"w": torch.zeros(2)}, str(ckpt / "adapter" / "adapter_model.safetensors"))
    if complete:
        (ckpt / "trainer_state.json").write_text(json.dumps({"iteration": int(name[5:11])}))
    return ckpt


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None  # no folder yet
    root.mkdir()
    assert latest_checkpoint(root) is None
    _fake_checkpoint(root, "iter_000001")
    _fake_checkpoint(root, "iter_000002")
    _fake_checkpoint(root, "iter_000010.tmp")  # half-written (even with its state file): ignored
    _fake_checkpoint(root, "iter_000011", complete=False)  # no trainer_state.json: not complete
    assert latest_checkpoint(root) == root / "iter_000002"
    _fake_checkpoint(root, "iter_000012")
    assert latest_checkpoint(root) == root / "iter_000012", "by iteration, newest last"


def test_prune_checkpoints_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for it in range(1, 6):
        _fake_checkpoint(root, f"iter_{it:06d}")
    prune_checkpoints(root, 0)
    assert len(list(root.iterdir())) == 5, "keep <= 0 keeps all"
    prune_checkpoints(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000004", "iter_000005"]


def test_atomic_write_text_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old\n")
    assert path.read_text() == "old\n"

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new\n" * 1000)
    assert path.read_text() == "old\n" and [p.name
            for p in tmp_path.iterdir()] == ["config.yaml"], "no partial or temporary file"
    monkeypatch.undo()
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_is_complete_or_absent(tmp_path):
    target = tmp_path / "warmup_model"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed while saving")
    assert list(tmp_path.iterdir()) == [], "a failed block leaves no folder and no .tmp"
    with atomic_dir(target) as tmp:
        (tmp / "old.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.json").write_text("{}")
            raise RuntimeError("killed while saving")
    assert ([p.name for p in target.iterdir()] == ["old.json"]
            and list(tmp_path.iterdir()) == [target]), "the old folder stays whole"
    with atomic_dir(target) as tmp:
        (tmp / "new.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["new.json"], "a completed block replaces the folder"


def _write_run_folder(root: Path, model_dir: Path, model, iterations: list[int]):
    """A run folder as the trainer writes it: config.yaml and LoRA checkpoints with non-zero adapters."""
    from peft import LoraConfig, get_peft_model

    run = root / "sokoban-t2po-test"
    (run / "checkpoints").mkdir(parents=True)
    config = {"model": {"path": str(model_dir)},
              "env": {"name": "sokoban", "options": {"dim_room": [5, 5]}, "val_options": {}},
              "rollout": {"max_new_tokens": 12, "tti_budget": 7, "val_temperature": 0.6, "val_top_p": 0.95,
                          "val_top_k": 20}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    peft_model = get_peft_model(model,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    for it in iterations:
        ckpt = run / "checkpoints" / f"iter_{it:06d}"
        peft_model.save_pretrained(ckpt / "adapter", safe_serialization=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"iteration": it}))
    (run / "checkpoints" / "iter_000099.tmp" / "adapter").mkdir(parents=True)  # half-written: ignored
    return run, peft_model


def _logits(tokenizer, *models) -> list[torch.Tensor]:
    ids = torch.tensor([tokenizer.encode("<think>push the box</think>")])
    with torch.no_grad():
        return [m(input_ids=ids).logits for m in models]


def test_run_folder_resolves_to_its_latest_checkpoint_merged(tiny_model_dir, tmp_path):
    base, _ = load_model(tiny_model_dir)
    run, peft_model = _write_run_folder(tmp_path, tiny_model_dir, base, [1, 2])
    source = locate_model(run)
    assert source.checkpoint == run / "checkpoints" / "iter_000002" and source.base == str(tiny_model_dir)
    assert source.short_name == "sokoban-t2po-test-iter_000002"
    merged, tokenizer, description = load_local_model(run)
    assert "LoRA adapter merged into" in description
    got, expected, plain = _logits(tokenizer, merged, peft_model, load_model(tiny_model_dir)[0])
    assert torch.allclose(got, expected, atol=1e-4), "merged weights act like base + adapter"
    assert not torch.allclose(got, plain, atol=1e-3), "the adapter changed the model"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        locate_model(run / "checkpoints" / "iter_000099.tmp")


def test_locate_policy_on_each_kind_of_argument(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)},
                                                     "rollout": {"tti": {"budget": 5}}}))
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint yet"):
        locate_model(run)
    ckpt = _fake_checkpoint(run / "checkpoints", "iter_000004")
    for arg in (run, ckpt):  # a run folder, or one of its checkpoints
        source = locate_model(arg)
        assert (source.checkpoint, source.run_dir, source.base, source.kind) == (ckpt, run,
                                                                                 str(tiny_model_dir), "adapter")
        assert source.run_config.rollout.tti.budget == 5, "the run's config, typed"
    (run / "warmup_model").mkdir()
    (run / "warmup_model" / "config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(run / "warmup_model" / "model.safetensors"))
    assert locate_model(run).base == str(run
                                         / "warmup_model"), "after a warm-up, checkpoints apply to the warm-up model"

    hf = locate_model(tiny_model_dir)
    assert hf.path == Path(tiny_model_dir).resolve() and hf.checkpoint is None and hf.run_config is None
    assert locate_model(None).path is None and locate_model("smollm2-135m-instruct").checkpoint is None
    with pytest.raises(FileNotFoundError, match="is not a directory: pass a t2po run folder, a checkpoint folder"):
        locate_model(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        locate_model(tmp_path / "empty")
    stray = _fake_checkpoint(tmp_path / "loose", "iter_000001")
    with pytest.raises(FileNotFoundError, match="not inside a t2po run folder"):
        locate_model(stray)


def test_combine_adapters_reads_target_modules_as_a_set(tmp_path):
    """peft writes target_modules in its set's order, which differs between processes (string hashing):
    a run resumed in a new process must still combine its RL adapter with the warm-up's. Other layouts
    are refused."""
    from safetensors.torch import load_file, save_file

    from t2po.checkpoints import combine_adapters

    def adapter(folder, modules, r, seed):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 2 * r,
                                                                "target_modules": modules}))
        g = torch.Generator().manual_seed(seed)
        save_file({"m.lora_A.weight": torch.randn(r, 6, generator=g),
                   "m.lora_B.weight": torch.randn(5, r, generator=g)},
                  str(folder / "adapter_model.safetensors"))

    adapter(tmp_path / "warm", ["q_proj", "v_proj", "k_proj"], 2, 0)
    adapter(tmp_path / "rl", ["k_proj", "q_proj", "v_proj"], 3, 1)
    assert combine_adapters(tmp_path / "warm", tmp_path / "rl") == 2
    combined = load_file(str(tmp_path / "rl" / "adapter_model.safetensors"))
    assert combined["m.lora_A.weight"].shape == (5, 6) and combined["m.lora_B.weight"].shape == (5, 5)
    adapter(tmp_path / "other", ["q_proj", "o_proj", "k_proj"], 3, 2)
    with pytest.raises(ValueError, match="different LoRA layouts"):
        combine_adapters(tmp_path / "warm", tmp_path / "other")
