"""A property-based test of the command line (Hypothesis): for every subcommand, generated argument
lists and config overrides (random keys, values and types, paths with `..`, huge numbers, unicode)
end with exit 0, or with one message and the documented status (2: the input; 3: a server that does
not answer), never a traceback, within a time and memory bound, and leave nothing behind: the
temporary workspace they run in is unchanged after a refused command, and a finished run in it
(`runs/victim`) stays byte-identical whatever is done.

Every generated command carries one "poison", a value that must be refused before any work (placed
last, where argparse and the overrides let the last value win), so that no example trains or serves
for real. Every case reported in issue 29 is among the explicit examples. The default run tries
`T2PO_CLI_EXAMPLES` (40) generated commands; a longer profile on demand:

    T2PO_CLI_EXAMPLES=2000 pytest tests/commands/test_cli_properties.py
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from t2po.cli import main

EXAMPLES = int(os.environ.get("T2PO_CLI_EXAMPLES", "40"))
SECONDS = 60.0  # per command: everything here is refused before a model loads (or is a listing)
MAX_RSS_GIB = 6.0  # the whole test process, torch and the tokenizers included
NO_GPU = "cuda" if not torch.cuda.is_available() else "cuda:99"  # a device that is not there


# ----------------------------------------------------------------------------------------------
# The workspace: a finished run to protect, a damaged run, a broken preset, an empty data file


def _workspace(root: Path) -> Path:
    victim = root / "runs" / "victim"
    (victim / "checkpoints" / "iter_000003").mkdir(parents=True)
    (victim / "config.yaml").write_text("trainer:\n  iterations: 3\n")
    (victim / "metrics.jsonl").write_text("".join(f'{{"iteration": {k}, "rollout/success_rate": 0.5}}\n'
                                                  for k in (1, 2, 3)))
    (victim / "validation.jsonl").write_text('{"tag": "final", "success_rate": 0.5}\n')
    (victim / "checkpoints" / "iter_000003" / "trainer_state.json").write_text('{"iteration": 3}')
    (victim / "summary.json").write_text('{"checkpoint": "runs/victim/checkpoints/iter_000003"}')
    broken = root / "runs" / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_bytes(b"model: [\x00\xff\n  : : :")
    (broken / "metrics.jsonl").write_text("")
    (root / "broken.yaml").write_text("rollout: {group_size: [1, 2\n")
    (root / "empty.jsonl").write_text("")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return _workspace(tmp_path_factory.mktemp("cli-properties") / "ws")


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------------------------
# Strategies

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=20)
HOSTILE_PATHS = ["zz/../victim", "a/../../..", "runs/victim", "runs/victim/new", "runs/victim/../victim",
                 "runs/../runs/victim",
                 "..", "/", "", "ü/../ß", "x" * 300, "runs/broken", "./../..", "nosuch"]
HOSTILE_NUMBERS = ["-1", "0", "1e309", "-1e309", "99999999999999999999", "nan", "inf", "70000", "0x10", "1.5", "", "٣"]
PATHS = st.sampled_from(HOSTILE_PATHS) | TEXT
NUMBERS = st.sampled_from(HOSTILE_NUMBERS) | st.integers(-(2**70), 2**70).map(str) | TEXT
KEYS = st.sampled_from(["rollout.group_size", "rollout.num_tasks", "env.options.dim_room", "env.options.num_boxes",
                        "trainer.run_name",
                        "trainer.output_dir", "optim.mini_batch_size", "warmup.epochs",
                        "rollout.sampling.max_new_tokens",
                        "model.path", "env.name", "trainer.iterations", "trainer.trackers"]) | TEXT
VALUES = NUMBERS | PATHS | st.sampled_from(["[100000, 100000]", "[1, 2", "{a: 1}", "null", "true", "[]", "'", "\\x00"])
OVERRIDES = st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES)


def _flags(names: list[str]) -> st.SearchStrategy[list[str]]:
    flag = st.sampled_from(names).flatmap(lambda f: st.tuples(st.just(f), NUMBERS | PATHS).map(list))
    return st.lists(flag, max_size=3).map(lambda pairs: [x for pair in pairs for x in pair])


# the poisons: each refused before any work; the generated command ends with one
TRAIN_POISON = st.sampled_from(["trainer.run_name=zz/../victim", "trainer.run_name=a/../../..",
                                "env.options.dim_room=[100000,100000]",
                                "rollout.group_size=100000", "trainer.output_dir=runs/victim",
                                "trainer.output_dir=a/../..",
                                "rollout.val_num_tasks=0",
                                "warmup.batch_size=-1"]) | st.builds(lambda k: f"nosuch{k}.key=1", TEXT)
OUT_POISON = st.sampled_from(["zz/../victim", "a/../../..", "runs/victim", "runs/victim/new", "runs/broken"])
EVAL_POISON = st.sampled_from([["--max-new-tokens", "0"], ["--episodes", "-1"], ["--device", NO_GPU],
                               ["--dtype", "float8"],
                               ["--batch-size", "0"]]) | OUT_POISON.map(lambda p: ["--out", p])


def _command(name: str, args: st.SearchStrategy[list[str]],
             poison: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(args, poison).map(lambda t: [name, *t[0], *t[1]])


COMMANDS = st.one_of(
    _command("train", st.tuples(st.sampled_from(["smoke", "grpo", "default"]),
                                st.lists(OVERRIDES, max_size=4)).map(lambda t: [t[0], *t[1]]),
             TRAIN_POISON.map(lambda p: [p])),
    _command("eval", st.tuples(st.sampled_from(["sokoban", "blackjack", "nosuch"]),
                               _flags(["--episodes", "--seed", "--top-k", "--concurrency",
        "--max-retries", "--split"])).map(lambda t: [t[0], *t[1]]),
             EVAL_POISON),
    _command("export", st.tuples(PATHS, _flags(["--dtype"])).map(lambda t: [t[0], *t[1]]),
             OUT_POISON.map(lambda p: ["--out", p])),
    _command("sft", st.tuples(st.sampled_from(["empty.jsonl", "nosuch.jsonl"]),
                              _flags(["--lr", "--seed"])).map(lambda t: [t[0], *t[1]]),
             st.sampled_from([["--epochs", "0"], ["--batch-size", "0"]]) | OUT_POISON.map(lambda p: ["--out", p])),
    _command("rft", st.tuples(st.sampled_from(["sokoban", "nosuch", "--preset=defualt"]),
                              _flags(["--episodes", "--seed", "--threshold"]))
             .map(lambda t: ["collect", t[0], *t[1]]),
             st.sampled_from([["--out", "x.txt"],
        ["--episodes", "-1", "--out", "d.jsonl"]]) | OUT_POISON.map(lambda p: ["--out", p + ".jsonl"])),
    _command("report", st.lists(st.sampled_from(["runs/victim", "runs/broken", "nosuch"]) | PATHS,
                                min_size=1, max_size=2),
             OUT_POISON.map(lambda p: ["--out", p])),
    _command("serve", st.lists(PATHS, max_size=1),
             st.sampled_from([["--port", "70000"], ["--port", "-1"], ["--device", NO_GPU],
                                                                    ["--dtype", "float8"], ["--tti-budget", "0"]])),
    _command("serve-retriever", _flags(["--topk", "--corpus"]),
             st.sampled_from([["--port", "70000"], ["--port", "-5"], ["--topk", "0"]])),
    _command("webshop-server", _flags(["--num-products", "--split"]),
             st.sampled_from([["--port", "65536"], ["--num-products", "0"]])),
    st.tuples(st.sampled_from(["envs", "presets"]), st.lists(TEXT, max_size=2)).map(lambda t: [t[0], *t[1]]),
    st.lists(TEXT, min_size=1,
             max_size=3).filter(lambda a: a[0] not in ("train", "eval", "serve", "serve-retriever", "webshop-server")),
)


# ----------------------------------------------------------------------------------------------
# The property


def run_cli(argv: list[str]) -> tuple[int, str, float]:
    """`t2po ARGV` in this process (as the console script calls it): exit status, stderr, seconds."""
    err = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue(), time.monotonic() - start


def _messages(stderr: str) -> list[str]:
    """The lines of stderr that start a message (not argparse's usage lines, indented continuations, or
    the progress bars of a model load)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith((" ", "usage:", "Loading"))
            and not line.startswith(" " * 2)]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(argv=COMMANDS)
# every case of issue 29
@example(argv=["train", "smoke", "trainer.run_name=zz/../victim", "trainer.iterations=1"])
@example(argv=["train", "smoke", "trainer.run_name=a/../../.."])
@example(argv=["train", "smoke", "env.options.dim_room=[100000,100000]"])
@example(argv=["train", "broken.yaml"])  # malformed YAML in a preset ...
@example(argv=["train", "--resume", "runs/broken"])  # ... and in a run folder
@example(argv=["train", "--resume", "runs/broken", "--print-config"])
@example(argv=["report", "runs/broken"])
@example(argv=["eval", "sokoban", "runs/broken"])
@example(argv=["export", "runs/broken", "--out", "exported"])
@example(argv=["serve", "runs/broken"])
@example(argv=["serve", "--port", "70000"])  # ports outside 0-65535
@example(argv=["serve-retriever", "--port", "70000"])
@example(argv=["webshop-server", "--port", "-1"])
@example(argv=["eval", "sokoban", "--device", NO_GPU])  # no such GPU
@example(argv=["serve", "--device", NO_GPU])
@example(argv=["sft", "empty.jsonl", "--out", "model", "--epochs", "0"])
@example(argv=["sft", "empty.jsonl", "--out", "model", "--batch-size", "0"])
@example(argv=["sft", "empty.jsonl", "--out", "model"])  # sft on an empty file
@example(argv=["eval", "sokoban", "--max-new-tokens", "0"])
@example(argv=["rft", "collect", "sokoban", "--episodes", "-1", "--out", "d.jsonl"])
@example(argv=["rft", "collect", "sokoban", "--out", "x.txt"])
@example(argv=["rft", "collect", "--out", "d.jsonl"])  # no, unknown or mistyped environment or preset
@example(argv=["rft", "collect", "nosuch", "--out", "d.jsonl"])
@example(argv=["rft", "collect", "--preset", "defualt", "--out", "d.jsonl"])
@example(argv=["rft", "collect", "sokoban", "--preset", "alfworld-cpu", "--out", "d.jsonl"])
@example(argv=["eval", "sokoban", "--dtype", "float8"])
# nothing listens
@example(argv=["eval", "sokoban", "--episodes", "1", "--api-base", "http://127.0.0.1:9/v1", "--model", "x",
               "--max-retries", "0"])
@example(argv=["eval", "sokoban", "--out", "zz/../victim"])  # --out of every command
@example(argv=["eval", "sokoban", "--out", "runs/victim"])
@example(argv=["export", "runs/victim", "--out", "zz/../victim"])
@example(argv=["export", "runs/victim", "--out", "runs/victim/exported"])
@example(argv=["rft", "collect", "sokoban", "--out", "zz/../victim/d.jsonl"])
@example(argv=["rft", "collect", "sokoban", "--out", "runs/victim/d.jsonl"])
@example(argv=["sft", "empty.jsonl", "--out", "zz/../victim"])
@example(argv=["sft", "empty.jsonl", "--out", "runs/victim"])
@example(argv=["report", "runs/victim", "--out", "zz/../victim"])
@example(argv=["report", "runs/victim", "--out", "runs/victim"])
def test_any_command_line_ends_cleanly(workspace, argv):
    before = _snapshot(workspace)
    outside = sorted(p.name for p in workspace.parent.iterdir())
    cwd = os.getcwd()
    os.chdir(workspace)
    old_key = os.environ.setdefault("OPENAI_API_KEY", "none")
    try:
        code, stderr, seconds = run_cli(argv)
    finally:
        os.chdir(cwd)
        if old_key == "none":
            os.environ.pop("OPENAI_API_KEY", None)
    after = _snapshot(workspace)
    assert "Traceback" not in stderr, stderr
    assert code in (0, 2, 3), (code, stderr)
    if code != 0:
        messages = _messages(stderr)
        assert len(messages) == 1 and messages[0].startswith("t2po"), stderr
        # a refused command leaves the workspace as it was (an eval that reached no server removes its folder)
        assert after == before, sorted(set(after) ^ set(before))
    assert {k: v for k, v in after.items() if k.startswith("runs/victim")} == {k: v for k, v in before.items()
                                                                               if k.startswith("runs/victim")}
    assert sorted(p.name for p in workspace.parent.iterdir()) == outside, "written beside the workspace"
    assert seconds < SECONDS, f"{argv} took {seconds:.0f}s"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 < MAX_RSS_GIB
    # exit 0 (a report into a new folder): the next starts afresh
    for name in sorted(set(after) - set(before), key=len, reverse=True):
        path = workspace / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def test_the_poisons_are_refused_by_the_mechanism_under_test(workspace):
    """The refusals come from the path rule and the ranges, not from some other error on the way: the
    same commands with a harmless value in place of the poison get further (another message)."""
    code, stderr, _ = run_cli(["train", "smoke", "trainer.run_name=zz/../victim", "--print-config"])
    assert code == 2 and "a run name is one folder name" in stderr
    code, stderr, _ = run_cli(["train", "smoke", "env.options.dim_room=[100000,100000]", "--print-config"])
    assert code == 2 and "sokoban takes dim_room in [4, 16]" in stderr
    assert run_cli(["train", "smoke", "trainer.run_name=victim2", "--print-config"])[0] == 0


@pytest.mark.parametrize("text,refused", [
    ("zz/../victim", True), ("a/../../..", True), ("runs/../x", True), ("..", True), ("/", True),
                                          ("", True), ("x/..", True),
    ("results/x", False), ("../results/x", False), ("../../x", False), ("./x", False), ("/tmp/x", False),
                                          ("~/x", False), ("ü-ß", False),
])
def test_the_path_rule_refuses_only_paths_that_go_back_up(text, refused):
    from t2po.paths import spelling_error

    assert (spelling_error(text, "--out") is not None) == refused
