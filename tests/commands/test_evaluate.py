"""`t2po eval`: the tiny model on Sokoban through the real rollout code, an API model through a real
`t2po serve` subprocess with injected faults, resuming after a kill, secrets, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import wait_for_server
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.evaluate import main, markdown_table, summarize
from t2po.locate import load_local_model
from t2po.policies import EnginePolicy
from t2po.rollout import RolloutSettings, collect_rollouts

SMALL_SOKOBAN = ["--env-option", "dim_room=[5,5]", "--env-option", "num_gen_steps=3", "--env-option", "max_steps=3"]
FAKE_KEY = "sk-t2po-FAKE-KEY-7f3a9c1e"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_eval_writes_json_markdown_and_traces(tiny_model_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "eval"
    # float32 like the `tiny_model` fixture replayed below (the default, auto, is bf16 on a bf16-capable CPU)
    rc = main(["sokoban", str(tiny_model_dir), "--episodes", "3", "--batch-size", "2", "--max-new-tokens", "12",
               "--dtype", "float32",
               *SMALL_SOKOBAN, "--out", str(out)])
    assert rc == 0
    records = read_jsonl(out / "episodes.jsonl")
    assert sorted(r["seed"] for r in records) == [0, 1, 2]
    report = json.loads((out / "eval.json").read_text())
    assert report["complete"] and report["episodes_finished"] == 3
    assert (report["setup"]["kind"] == "local" and report["setup"]["temperature"] == 0.6
            and report["setup"]["top_k"] == 20)
    overall = report["summary"]["all"]
    assert overall["success"] == pytest.approx(sum(r["won"] for r in records) / 3)
    steps = sum(r["turns"] for r in records)
    assert overall["invalid_action_rate"] == pytest.approx(sum(r["invalid_actions"] for r in records) / steps)
    for r in records:
        header, *turns = read_jsonl(out / r["trace"])
        assert header["type"] == "episode" and header["seed"] == r["seed"] and "final_observation" in header
        assert len(turns) == r["turns"] >= 1
        assert sum(t["completion_tokens"] for t in turns) == r["completion_tokens"]
        assert all({"observation", "prompt", "response", "action", "valid", "reward"} <= set(t) for t in turns)
    table = (out / "results.md").read_text()
    printed = capsys.readouterr().out
    assert "| all | 3 |" in table and "invalid actions" in table and "TTI: " in table
    assert table in printed
    # progress while a batch plays (stdout is not a terminal here: plain lines)
    assert "[episodes 1-2 of 3] 0/2 episodes, turn 1/3" in printed and "[episodes 3-3 of 3] 1/1 episodes" in printed

    # the same rollout code as training: the first batch (seeds 0, 1) replayed directly gives the same responses
    model, tokenizer = tiny_model
    env = make_env("sokoban", split="valid", dim_room=(5, 5), num_gen_steps=3, max_steps=3)
    direct = collect_rollouts(EnginePolicy(HFEngine(model, tokenizer), SamplingParams(0.6, 0.95, 20, 12),
                                           InterventionConfig()), env,
                              [0, 1], RolloutSettings(), seed=0)
    for episode in direct.episodes:
        traced = read_jsonl(out / f"traces/seed-{episode.seed:06d}.jsonl")[1:]
        assert [t["response"] for t in traced] == [t.response_text for t in episode.traces]


def test_api_eval_through_served_model_retries_faults_and_hides_the_key(tiny_model_dir, tmp_path, capfd, monkeypatch):
    """An OpenAI-compatible server in a subprocess (`t2po serve`) answers 429, 503, a sleep past the
    client's timeout, an empty and a malformed answer first; the evaluation retries and completes."""
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "t2po.serve", str(tiny_model_dir), "--port", "0",
                                   "--served-model-name", "tiny-agent",
                                   "--inject-faults", "429*2,sleep=6,503,empty,malformed"], stdout=f,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        url = wait_for_server(server, log)
        monkeypatch.setenv("T2PO_TEST_KEY", FAKE_KEY)
        out = tmp_path / "api-eval"
        rc = main(["sokoban", "--api-base", url, "--model", "tiny-agent", "--api-key-env", "T2PO_TEST_KEY",
                   "--episodes", "3",
                   "--concurrency", "2", "--max-new-tokens", "12", "--request-timeout", "3", "--retry-backoff", "0.05",
                   "--max-retries", "10", "--price-input", "1.0", "--price-output", "2.0", *SMALL_SOKOBAN,
                   "--out", str(out)])
        assert rc == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = json.loads((out / "eval.json").read_text())
    assert report["complete"] and report["setup"]["kind"] == "api" and report["setup"]["model"] == "tiny-agent"
    records = read_jsonl(out / "episodes.jsonl")
    assert sorted(r["seed"] for r in records) == [0, 1, 2]
    reasons: dict[str, int] = {}
    for r in records:
        for k, v in r["retry_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons.get("429") == 2 and reasons.get("503") == 1 and reasons.get("timeout", 0) >= 1
    overall = report["summary"]["all"]
    assert overall["retries"] == sum(reasons.values()) and overall["requests"] == overall["retries"] + sum(r["turns"]
            for r in records)
    assert overall["empty_or_malformed_answers"] == 2 and overall["retry_reasons"] == reasons
    results = (out / "results.md").read_text()
    assert f"API requests: {overall['requests']} ({overall['retries']} retries: 429 x2, 503 x1" in results
    turns = [t for r in records for t in read_jsonl(out / r["trace"])[1:]]
    bad = [t for t in turns if t["finish_reason"] in ("empty", "malformed")]
    assert len(bad) == 2 and all(not t["valid"] and t["response"] == ""
                                 for t in bad), "empty/malformed answers are invalid actions"
    assert overall["cost_usd"] == pytest.approx((overall["prompt_tokens"] * 1.0
                                                 + overall["completion_tokens"] * 2.0) / 1e6)
    assert overall["prompt_tokens"] > 0
    # the key is nowhere: not in any written file, not on stdout or stderr
    captured = capfd.readouterr()
    assert FAKE_KEY not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_killed_eval_resumes_and_skips_finished_episodes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "resumable"
    args = ["sokoban", str(tiny_model_dir), "--episodes", "10", "--batch-size", "1", "--max-new-tokens", "8",
            *SMALL_SOKOBAN, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "t2po.evaluate", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    episodes = out / "episodes.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if episodes.exists() and len(episodes.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = episodes.read_text()
    finished = [json.loads(line)["seed"] for line in before.splitlines()]
    assert 2 <= len(finished) < 10, "the kill must land mid-run"
    traces = {s: (out / f"traces/seed-{s:06d}.jsonl").read_bytes() for s in finished}
    with open(episodes, "a") as f:
        f.write('{"env": "sokoban", "split": "valid", "se')  # a line cut by a kill

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"resuming: {len(finished)} finished episodes skipped, {10 - len(finished)} to play" in printed
    after = episodes.read_text()
    assert after.startswith(before), "finished episodes are kept as they were"
    seeds = [json.loads(line)["seed"] for line in after.splitlines()]
    assert sorted(seeds) == list(range(10)), "every episode exactly once"
    assert all((out / f"traces/seed-{s:06d}.jsonl").read_bytes() == traces[s]
               for s in finished), "finished episodes are not replayed"
    assert json.loads((out / "eval.json").read_text())["episodes_finished"] == 10


def _logits(tokenizer, *models) -> list[torch.Tensor]:
    ids = torch.tensor([tokenizer.encode("<think>push the box</think>")])
    with torch.no_grad():
        return [m(input_ids=ids).logits for m in models]


def test_bad_input_fails_with_a_message_that_names_the_fix(tiny_model_dir, tmp_path, capsys, monkeypatch):
    assert main(["sokoban", str(tiny_model_dir), "--env-option", "dim_rom=[5,5]", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean 'dim_room'" in capsys.readouterr().err
    assert main(["sokoban", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "Hugging Face model directory" in capsys.readouterr().err
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert main(["sokoban", "--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env",
                 "NO_SUCH_KEY_VAR"]) == 2
    assert "export NO_SUCH_KEY_VAR=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sokoban", "--model", "gpt-4o"])  # no --api-base
    assert "--api-base" in capsys.readouterr().err
    # a folder holding another setup is refused, not mixed
    monkeypatch.setenv("SOME_KEY", "x")
    api = ["sokoban", "--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "SOME_KEY", "--episodes",
           "1", "--out", str(tmp_path / "c")]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "eval.json").write_text(json.dumps({"setup": {"kind": "api", "model": "other"}}))
    assert main(api) == 2
    assert "different setup" in capsys.readouterr().err


def test_summary_and_table_on_hand_made_episodes():
    def rec(seed, won, turns, invalid, task, score, pt=100, ct=10):
        return {"seed": seed, "won": won, "turns": turns, "invalid_actions": invalid, "reward": 1.0 if won
                else 0.0, "score": score,
                "metrics": {"task_type": task, "score": score}, "prompt_tokens": pt, "completion_tokens": ct}

    records = [rec(0, True, 2, 0, "pick", 1.0), rec(1, False, 4, 2, "pick", 0.5), rec(2, True, 3, 1, "clean", 0.8)]
    s = summarize(records, price_input_per_1m=2.0, price_output_per_1m=10.0)
    a = s["all"]
    assert a["episodes"] == 3 and a["success"] == pytest.approx(2 / 3)
    assert a["success_stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert a["invalid_action_rate"] == pytest.approx(3 / 9) and a["mean_turns"] == pytest.approx(3.0)
    assert a["score"] == pytest.approx(2.3 / 3)
    assert a["cost_usd"] == pytest.approx((300 * 2.0 + 30 * 10.0) / 1e6)
    pick = s["by"]["task_type"]["pick"]
    assert pick["episodes"] == 2 and pick["success"] == 0.5 and pick["invalid_action_rate"] == pytest.approx(2 / 6)
    table = markdown_table(s, "title", ["note"])
    assert "| all | 3 | 66.7% ± 27.2 | 0.767 | 3.0 | 33.3% | 100 / 10 | 0.0009 |" in table
    assert "| task_type=clean | 1 | 100.0% ± 0.0 |" in table


@pytest.mark.parametrize("lora", [True, False])
def test_sharded_checkpoint_loads_as_trained(tiny_model_dir, tmp_path, lora):
    """A checkpoint written by `save_sharded` (as several ranks write it: `shard-*.safetensors`, no
    adapter/ or model/ folder) loads for `t2po eval` / `t2po serve` with the run's LoRA merged in."""
    from t2po.config import load_config
    from t2po.distributed import save_sharded
    from t2po.models import add_lora, load_model

    cfg = load_config("default",
                      [f"model.path={tiny_model_dir}", f"model.lora={str(lora).lower()}", "model.lora_rank=4"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    model = load_model(tiny_model_dir)[0]
    if lora:
        model = add_lora(model, cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or not lora):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    save_sharded(run / "checkpoints" / "iter_000003", model, torch.optim.AdamW(model.parameters()), {"iteration": 3})
    assert any((run / "checkpoints" / "iter_000003").glob("shard-*.safetensors"))

    loaded, tokenizer, description = load_local_model(run)
    assert "sharded" in description and "iter_000003" in description
    got, expected, plain = _logits(tokenizer, loaded, model, load_model(tiny_model_dir)[0])
    assert torch.allclose(got, expected, atol=1e-4), "the sharded weights act like the model that was saved"
    assert not torch.allclose(got, plain, atol=1e-3), "the checkpoint changed the model"
    assert main(["sokoban", str(run), "--episodes", "1", "--max-new-tokens", "4", *SMALL_SOKOBAN, "--quiet", "--out",
                 str(tmp_path / "eval")]) == 0
