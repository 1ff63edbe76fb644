"""Every file read back from a run folder, damaged three ways (truncated, garbage, deleted), under each
command that reads it: `train --resume`, `eval`, `serve` and `export` (and `report` for the logs). A
damaged file of the newest checkpoint falls back to the one before with a note naming what was
skipped; a damaged warm-up, config or run state is one line naming the file and the fix (exit 2); a
damaged log line is dropped with a note. Never a traceback. Plus the path rule on a real finished run:
a run name or `--out` that escapes is refused and the run stays byte-identical (t2po/paths.py,
t2po/runfiles.py)."""

from __future__ import annotations

import contextlib
import io
import random
import shutil
from pathlib import Path

import pytest

from helpers import run_training
from t2po.cli import main as cli_main
from t2po.config import load_config


def overrides(model_dir: Path, out: Path) -> list[str]:
    return [f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.run_name=run", "trainer.iterations=2",
            "trainer.trackers=[console]", "trainer.val_before_train=false", "trainer.val_every=0",
            "trainer.keep_checkpoints=3",
            "trainer.trace_episodes=0", "trainer.report=false", "warmup.episodes=1", "warmup.epochs=1",
            "rollout.num_tasks=1",
            "rollout.group_size=2", "rollout.sampling.max_new_tokens=4", "rollout.val_num_tasks=1",
            "rollout.tti.turn_score_skip=0",
            "env.options.max_steps=2", "optim.mini_batch_size=4", "model.lora_rank=4"]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-iteration run with a LoRA warm-up (its checkpoints carry the warm-up's adapter ranks)."""
    out = tmp_path_factory.mktemp("run-files")
    run_training(load_config("default", overrides(tiny_model_dir, out)))
    run = out / "run"
    assert (run / "checkpoints" / "iter_000001").is_dir() and (run / "checkpoints" / "iter_000002").is_dir()
    assert (run / "warmup_model" / "adapter_config.json").is_file()
    return run


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


COMMANDS = {
    "train": lambda run, tmp: ["train", "--quiet", "--resume", str(run)],
    "eval": lambda run, tmp: ["eval", "sokoban", str(run), "--episodes", "1", "--max-new-tokens", "4", "--quiet",
                              "--out", str(tmp / "eval")],
    # serve loads the policy, then cannot bind the address (a name that does not resolve): exit 2 after the part under
    # test
    "serve": lambda run, tmp: ["serve", str(run), "--host", "no-such-host.invalid", "--port", "0"],
    "export": lambda run, tmp: ["export", str(run), "--out", str(tmp / "exported")],
    "report": lambda run, tmp: ["report", str(run), "--out", str(tmp / "report")],
}
NEWEST = "checkpoints/iter_000002"
# file -> (commands that read it, what they do: "fallback" to iter_000001 with a note, "line": one line + exit 2,
# "note": a dropped-line note and exit 0, "ignored": exit 0 with the newest checkpoint)
FILES = {
    f"{NEWEST}/checkpoint.json": (("train", "eval", "serve", "export"), "fallback"),
    f"{NEWEST}/trainer_state.json": (("train", "eval", "serve", "export"), "fallback"),
    f"{NEWEST}/adapter/adapter_model.safetensors": (("train", "eval", "serve", "export"), "fallback"),
    f"{NEWEST}/adapter/adapter_config.json": (("train", "eval", "export"), "fallback"),
    f"{NEWEST}/optimizer.safetensors": (("train",), "fallback"),
    f"{NEWEST}/optimizer.json": (("train",), "fallback"),
    f"{NEWEST}/rng.safetensors": (("train",), "fallback"),
    "warmup_model/adapter_model.safetensors": (("train", "eval", "serve", "export"), "line"),
    "warmup_model/adapter_config.json": (("train", "eval", "export"), "line"),
    "config.yaml": (("train", "eval", "serve", "export", "report"), "line"),
    "run_state.json": (("train",), "line"),
    "metrics.jsonl": (("train", "report"), "note"),
    "validation.jsonl": (("train", "report"), "note"),
}
DAMAGES = {
    "truncated": lambda b: b[: len(b) - max(9, len(b) // 3)],  # cut inside the last line of a two-line log too
    "garbage": lambda b: random.Random(0).randbytes(max(len(b), 64)),
    "deleted": None,
}
CASES = [(f, d, c) for f, (commands, _) in FILES.items() for d in DAMAGES for c in commands]


@pytest.mark.parametrize("name,damage,command", CASES, ids=[f"{c}-{d}-{f.replace('/', '.')}" for f, d, c in CASES])
def test_a_damaged_run_file_falls_back_or_is_one_line(finished_run, tmp_path, name, damage, command):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    target = run / name
    if DAMAGES[damage] is None:
        target.unlink()
    else:
        target.write_bytes(DAMAGES[damage](target.read_bytes()))
    code, out, err = run_cli(COMMANDS[command](run, tmp_path))
    assert "Traceback" not in err, err
    outcome = FILES[name][1]
    expected = 2 if outcome == "line" or command == "serve" else 0
    assert code == expected, (code, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("t2po")]
    short = name.split("/", 2)[-1] if name.startswith(NEWEST) else name
    if outcome == "fallback":
        assert any(f"skipped checkpoint {run / NEWEST}: {short}" in line for line in lines), err
        if command == "train":
            assert (run / "checkpoints" / "iter_000002"
                    / "trainer_state.json").exists(), "iteration 2 was redone and saved again"
    elif outcome == "line":
        assert len(lines) == 1 and short.split("/")[-1] in lines[0], err
        assert ("restore" in lines[0] or "start a new run" in lines[0]), lines[0]
    elif damage != "deleted":  # a log: the damaged lines dropped with a note
        assert any(f"{Path(name).name}: dropped line" in line for line in lines), err
    if command == "serve" and outcome != "line":
        assert "cannot bind no-such-host.invalid" in err  # the policy loaded: serve got as far as the socket


def test_the_newest_checkpoint_is_used_when_nothing_is_damaged(finished_run, tmp_path):
    """The other side of the fallback: undamaged, eval and export take iter_000002 and skip nothing."""
    code, out, err = run_cli(COMMANDS["export"](finished_run, tmp_path))
    assert code == 0 and "skipped" not in err and "iter_000002" in (tmp_path / "exported" / "export.json").read_text()


@pytest.mark.parametrize("argv", [
    ["train", "trainer.run_name=zz/../run"], ["train", "trainer.run_name=a/../../.."],
                                  ["train", "trainer.output_dir={runs}/run"],
    ["eval", "sokoban", "{runs}/run", "--episodes", "1", "--out", "{runs}/zz/../run"],
                                  ["eval", "sokoban", "--out", "{runs}/run"],
    ["export", "{runs}/run", "--out", "{runs}/zz/../run"], ["export", "{runs}/run", "--out", "{runs}/run/exported"],
    ["sft", "{runs}/run/warmup_demos.jsonl", "--out", "{runs}/zz/../run"],
                                  ["sft", "{runs}/run/warmup_demos.jsonl", "--out", "{runs}/run/sft"],
    ["rft", "collect", "sokoban", "--episodes", "1", "--out", "{runs}/run/demos.jsonl"],
    ["report", "{runs}/run", "--out", "{runs}/zz/../run"], ["report", "{runs}/run", "--out", "{runs}/run/checkpoints"],
])
def test_an_escaping_run_name_or_out_is_refused_and_the_run_stays_byte_identical(tiny_model_dir, finished_run, argv):
    """issue 29: `trainer.run_name=zz/../victim` wrote into a finished run. Every command's output path
    that lands in (or is) a finished run is refused with one line, exit 2, and the run is unchanged."""
    runs = finished_run.parent
    before = _tree(finished_run)
    args = [a.format(runs=runs) for a in argv]
    if args[0] == "train":
        args += [o for o in overrides(tiny_model_dir, runs)
                 if not o.startswith(("trainer.run_name=", "trainer.output_dir="))
                 ] + ([f"trainer.output_dir={runs}"]
                      if not any(a.startswith("trainer.output_dir=") for a in args) else [])
    code, out, err = run_cli(args)
    assert code == 2 and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("t2po")]) == 1, err
    assert _tree(finished_run) == before, "the finished run was changed"
    assert not (runs / "zz").exists()
