"""`t2po eval`: how well a policy plays held-out tasks, for local models and for LLMs behind an API.

    t2po eval sokoban runs/sokoban-t2po-20260101-120000          # a run (its latest checkpoint)
    t2po eval sokoban runs/.../checkpoints/iter_000010 --episodes 128
    t2po eval alfworld path/to/hf-model --split valid_unseen
    t2po eval sokoban                                            # the embedded SmolLM2-135M-Instruct
    t2po eval points24 path/to/Qwen2.5-VL-3B-Instruct --env-option observation_mode=image
    t2po eval sokoban --api-base https://api.openai.com/v1 --model gpt-4o-mini --concurrency 8

- Episodes: task seeds `--seed`, `--seed`+1, ... (`--episodes` of them) of the `--split` split; an
  episode is keyed by (environment, split, seed).
- Environments in image mode (`--env-option observation_mode=image` or `both`) need a
  vision-language model (a local VLM directory, a run or checkpoint trained from one, or `tiny-vlm`,
  a tiny random VLM for smoke runs) or an API model that takes images.
- Every policy plays through the training rollout loop (`t2po.rollout.collect_rollouts`): the same
  prompts, parsing, invalid-action penalty, turn limit and trace format as training. Model loading
  (run folders, checkpoints of one or several ranks, LoRA or full weights) is `t2po.checkpoints`.
- Local models (`collect_rollouts` with `HFEngine`), TTI on
  and TDS off (docs/method.md §3: evaluation uses TTI but not TDS), validation sampling (docs/method.md §6: temperature
  0.6, top-p 0.95, top-k 20), `--batch-size` episodes at a time. A run folder or checkpoint also
  supplies its environment options, response budget and TTI settings (flags override them).
- API models (`t2po.engines.openai_api`, played as `t2po.policies.APIPolicy`): one chat request per
  turn with the same prompt text as the user message, `--concurrency` episodes in parallel threads
  (one environment each), retries with
  back-off, token usage and cost. An empty or malformed answer is an invalid action.
- Output (`--out`, default `evals/<env>-<split>-<model>`): `eval.json` (setup and summary),
  `results.md` (the table), `episodes.jsonl` (one line per finished episode) and
  `traces/seed-NNNNNN.jsonl` (per episode: a header line, then one line per turn, as
  `t2po.traces.episode_trace` writes it: observation, prompt, model output, action, validity,
  reward, token counts). Each episode is written when it finishes (trace
  renamed into place, then its line appended and synced); rerunning the same command skips the
  finished episodes, so an interrupted run loses nothing finished. A folder holding results of a
  different setup (model, sampling, environment options) is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from t2po.bounds import BATCH_SIZE, EPISODES, NEW_TOKENS, SEED, bounded
from t2po.checkpoints import atomic_write_text
from t2po.config import Config, RolloutConfig
from t2po.engines import engine_spec
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.openai_api import APIError, OpenAIChatAgent, RetryPolicy, api_key_from_env
from t2po.envs import BatchEnv, env_option_errors, make_env, parse_env_options, split_env_overrides
from t2po.errors import InvalidInput, UserError
from t2po.locate import ModelSource, check_device, intervention_for, load_local_model, locate_model
from t2po.paths import first_missing, new_folder
from t2po.policies import NO_ANSWER, APIPolicy, EnginePolicy
from t2po.rollout import INVALID_ACTION_PENALTY, Episode, RolloutSettings, collect_rollouts
from t2po.traces import episode_trace

DEFAULT_EPISODES = 16


# ----------------------------------------------------------------------------------------------
# The output folder


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ResultsFolder:
    """The files of one evaluation (see the module docstring); each finished episode is durable on its own."""

    def __init__(self, path: Path, setup: dict[str, Any]) -> None:
        self.path = Path(path)
        self.setup = _json_safe(setup)
        self.traces = self.path / "traces"
        self.episodes_file = self.path / "episodes.jsonl"
        self.summary_file = self.path / "eval.json"
        self.table_file = self.path / "results.md"
        self.previous_wall_seconds = 0.0  # of earlier sessions, read by `open`

    def open(self) -> dict[int, dict]:
        """Create the folder or check that it holds the same setup; return the finished episodes by seed."""
        self.traces.mkdir(parents=True, exist_ok=True)
        if self.summary_file.exists():
            try:
                report = json.loads(self.summary_file.read_text())
                previous = report["setup"]
                self.previous_wall_seconds = float(report.get("wall_seconds", 0.0))
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidInput(f"{self.summary_file} is unreadable ({e}); delete {self.path} or pass another "
                                   "--out") from None
            changed = sorted(k for k in set(previous) | set(self.setup) if previous.get(k) != self.setup.get(k))
            if changed:
                diffs = "; ".join(f"{k}: {previous.get(k)!r} there, {self.setup.get(k)!r} now" for k in changed)
                raise InvalidInput(f"{self.path} holds results of a different setup ({diffs}); pass another --out, or "
                                   "delete the folder to start over")
        finished: dict[int, dict] = {}
        if self.episodes_file.exists():
            lines = self.episodes_file.read_text().splitlines()
            good = []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # the tail of a write cut by a kill: that episode is redone
                    continue
                if (self.path / record["trace"]).is_file():
                    finished[record["seed"]] = record
                    good.append(line)
            if len(good) != len(lines):
                atomic_write_text(self.episodes_file, "".join(l + "\n" for l in good))
        return finished

    def add(self, record: dict[str, Any], header: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        """Write one finished episode: its trace (renamed into place), then its line in episodes.jsonl."""
        lines = [json.dumps(_json_safe({"type": "episode", **record, **header}))]
        lines += [json.dumps(_json_safe({"type": "turn", **s})) for s in steps]
        atomic_write_text(self.path / record["trace"], "\n".join(lines) + "\n")
        with open(self.episodes_file, "a") as f:  # one write of one line: whole or (after a kill) dropped at load
            f.write(json.dumps(_json_safe(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict[str, Any], table: str) -> None:
        atomic_write_text(self.summary_file, json.dumps(_json_safe({"setup": self.setup, **summary}), indent=1) + "\n")
        atomic_write_text(self.table_file, table)


def trace_name(seed: int) -> str:
    return f"traces/seed-{seed:06d}.jsonl"


# ----------------------------------------------------------------------------------------------
# Summaries


def summarize(records: list[dict[str, Any]], price_input_per_1m: float = 0.0,
              price_output_per_1m: float = 0.0) -> dict[str, Any]:
    """Success (with its standard error), score, turns, invalid-action rate and tokens over all
    episodes and per value of each string-valued episode metric (task type, data source, ...)."""

    def group(rs: list[dict]) -> dict[str, Any]:
        n = len(rs)
        turns = sum(r["turns"] for r in rs)
        success = sum(r["won"] for r in rs) / n if n else 0.0
        prompt_tokens = sum(r["prompt_tokens"] for r in rs)
        completion_tokens = sum(r["completion_tokens"] for r in rs)
        out: dict[str, Any] = {
            "episodes": n,
            "success": success,
            "success_stderr": math.sqrt(success * (1 - success) / n) if n else 0.0,
            "mean_turns": turns / n if n else 0.0,
            "invalid_action_rate": sum(r["invalid_actions"] for r in rs) / turns if turns else 0.0,
            "mean_reward": sum(r["reward"] for r in rs) / n if n else 0.0,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        scores = [r["score"] for r in rs if r.get("score") is not None]
        if scores:
            out["score"] = sum(scores) / len(scores)
        if price_input_per_1m or price_output_per_1m:
            out["cost_usd"] = (prompt_tokens * price_input_per_1m + completion_tokens * price_output_per_1m) / 1e6
        if any("requests" in r for r in rs):
            out["requests"] = sum(r.get("requests", 0) for r in rs)
            out["retries"] = sum(r.get("retries", 0) for r in rs)
            out["empty_or_malformed_answers"] = sum(r.get("empty_or_malformed", 0) for r in rs)
            reasons: dict[str, int] = {}
            for r in rs:
                for k, v in r.get("retry_reasons", {}).items():
                    reasons[k] = reasons.get(k, 0) + v
            out["retry_reasons"] = reasons
        if any("think_tokens" in r for r in rs):
            out["think_tokens_per_turn"] = sum(r.get("think_tokens", 0) for r in rs) / turns if turns else 0.0
            out["tti_budget_triggers"] = sum(r.get("tti_budget_triggers", 0) for r in rs)
            out["tti_stagnation_triggers"] = sum(r.get("tti_stagnation_triggers", 0) for r in rs)
        return out

    by: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        for key, value in r["metrics"].items():
            if isinstance(value, str):
                by.setdefault(key, {}).setdefault(value, []).append(r)
    return {
        "all": group(records),
        "by": {key: {value: group(rs) for value, rs in sorted(values.items())} for key, values in sorted(by.items())},
    }


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(summary: dict[str, Any], title: str, notes: list[str]) -> str:
    """The results as a Markdown section: title, notes, one row for all episodes and one per category."""
    rows = [("all", summary["all"])] + [(f"{key}={value}", g) for key, values in summary["by"].items()
                                        for value, g in values.items()]
    has_score = any("score" in g for _, g in rows)
    has_cost = any("cost_usd" in g for _, g in rows)
    header = ["", "episodes", "success", *(["score"] if has_score else []), "turns", "invalid actions",
              "tokens in / out per episode", *(["cost (USD)"] if has_cost else [])]
    lines = [f"### {title}", "", *notes, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, g in rows:
        n = max(g["episodes"], 1)
        cells = [
            name,
            str(g["episodes"]),
            f"{_percent(g['success'])} ± {100 * g['success_stderr']:.1f}",
            *([f"{g['score']:.3f}" if "score" in g else ""] if has_score else []),
            f"{g['mean_turns']:.1f}",
            _percent(g["invalid_action_rate"]),
            f"{g['prompt_tokens'] / n:,.0f} / {g['completion_tokens'] / n:,.0f}",
            *([f"{g.get('cost_usd', 0.0):.4f}"] if has_cost else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Success ± its standard error over episodes."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Episode records (what a played episode leaves in the folder)


def episode_files(episode: Episode, tokenizer: Any, env: str, split: str, seconds: float) -> tuple[dict,
                                                                                                   dict, list[dict]]:
    """(record for episodes.jsonl, trace header, trace turns) of a played episode; the trace is the
    training trace (`t2po.traces.episode_trace`)."""
    trace = episode_trace(episode, tokenizer)
    steps = trace.pop("steps")
    traces = episode.traces
    score = episode.metrics.get("score")
    record = {
        "env": env,
        "split": split,
        "seed": episode.seed,
        "won": bool(episode.won),
        "score": float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
        "turns": len(steps),
        "invalid_actions": sum(not s["valid"] for s in steps),
        "reward": sum(s["reward"] for s in steps),
        "truncated": episode.truncated,
        "metrics": episode.metrics,
        "prompt_tokens": sum(s["prompt_tokens"] for s in steps),
        "completion_tokens": sum(s["completion_tokens"] for s in steps),
        "seconds": seconds,
        "trace": trace_name(episode.seed),
    }
    if tokenizer is not None:  # a token-level policy: the thinking intervention's work
        record["think_tokens"] = sum(t.think_length for t in traces)
        record["tti_budget_triggers"] = sum(t.tti_triggers.get("budget", 0) for t in traces)
        record["tti_stagnation_triggers"] = sum(t.tti_triggers.get("stagnation", 0) for t in traces)
    else:  # an API model: what the answers cost in requests
        record["requests"] = sum(s["attempts"] for s in steps)
        record["retries"] = record["requests"] - len(steps)
        reasons: dict[str, int] = {}
        for s in steps:
            for reason in s["retry_reasons"]:
                reasons[reason] = reasons.get(reason, 0) + 1
        record["retry_reasons"] = reasons
        record["empty_or_malformed"] = sum(s["finish_reason"] in NO_ANSWER for s in steps)
    return record, {"final_observation": trace["final_observation"]}, steps


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class EvalRun:
    """One `t2po eval` invocation, resolved."""

    env_name: str
    split: str
    env_options: dict[str, Any]
    seeds: list[int]
    folder: ResultsFolder
    title: str
    notes: list[str]
    price_input_per_1m: float = 0.0
    price_output_per_1m: float = 0.0
    quiet: bool = False
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def make_env(self) -> BatchEnv:
        return make_env(self.env_name, split=self.split, **self.env_options)

    def finish_episode(self, done: dict[int, dict], record: dict, header: dict, steps: list[dict]) -> None:
        self.folder.add(record, header, steps)
        done[record["seed"]] = record
        self.log(f"[{sum(s in done for s in self.seeds):>4}/{len(self.seeds)}] seed {record['seed']}: "
                 f"{'success' if record['won'] else 'failure'}, {record['turns']} turns, "
                 f"{record['invalid_actions']} invalid, {record['seconds']:.1f}s")
        self.write_summary(done)

    def write_summary(self, done: dict[int, dict]) -> dict[str, Any]:
        records = [done[s] for s in self.seeds if s in done]
        summary = summarize(records, self.price_input_per_1m, self.price_output_per_1m)
        wall = self.folder.previous_wall_seconds + time.monotonic() - self.started
        body = {
            "episodes_requested": len(self.seeds),
            "episodes_finished": len(records),
            "complete": len(records) == len(self.seeds),
            "seeds": [self.seeds[0], self.seeds[-1]],
            "wall_seconds": wall,  # all sessions of this folder, model loading included
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": summary,
        }
        a = summary["all"]
        notes = self.notes + [f"Episodes: {len(records)} of {len(self.seeds)} finished (task seeds "
                              f"{self.seeds[0]}-{self.seeds[-1]}), {wall:.0f} s wall time."]
        if "requests" in a:
            reasons = ", ".join(f"{k} x{v}" for k, v in sorted(a["retry_reasons"].items()))
            notes.append(f"API requests: {a['requests']} ({a['retries']} "
                         f"{'retry' if a['retries'] == 1 else 'retries'}{': ' + reasons if reasons else ''}); empty or "
                         f"malformed answers: {a['empty_or_malformed_answers']}.")
        if "think_tokens_per_turn" in a:
            notes.append(f"TTI: {a['tti_budget_triggers']} budget and {a['tti_stagnation_triggers']} stagnation "
                         f"triggers; {a['think_tokens_per_turn']:.1f} think tokens per turn.")
        self.folder.write_summary(body, markdown_table(summary, self.title, notes))
        return body


def _parse_env_options(items: list[str], env_name: str) -> dict[str, Any]:
    """`--env-option key=value` pairs (YAML values) checked against the environment's constructor."""
    options = parse_env_options(items)
    if "split" in options:
        raise InvalidInput("--env-option split=...: use --split instead")
    errors = env_option_errors(env_name, options, "--env-option ")
    if errors:
        raise InvalidInput(errors[0])
    return options


def evaluation_sampling(run_config: Config | None) -> SamplingParams:
    """Validation sampling (docs/method.md §6): a run's own `rollout.val_sampling`, else the config's defaults
    with the engines' default response budget."""
    if run_config is not None:
        return run_config.resolved_rollout().val_sampling
    return dataclasses.replace(RolloutConfig().val_sampling, max_new_tokens=SamplingParams().max_new_tokens)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


EVAL_HELP = """\
Evaluate a policy on held-out tasks: a t2po run folder or checkpoint, a local Hugging Face model
directory, the embedded SmolLM2-135M-Instruct (no MODEL), or an LLM behind an OpenAI-compatible API
(--api-base URL --model NAME; the key is read from the variable named by --api-key-env).

  t2po eval sokoban runs/sokoban-t2po-20260101-120000 --episodes 128
  t2po eval sokoban --episodes 8 env.options.dim_room=[5,5]      (as in `t2po train`; --env-option dim_room=[5,5] also \
works)
  OPENAI_API_KEY=... t2po eval alfworld --split valid_unseen --api-base https://api.openai.com/v1 --model gpt-4o-mini

Results go to --out (default evals/<env>-<split>-<model>) as each episode finishes; rerunning the
same command resumes, skipping finished episodes.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2po eval", description=EVAL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("env", metavar="ENV", help="environment name (see `t2po envs`)")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
            help="run folder, checkpoint folder, Hugging Face model directory (causal LM or vision-language model) or "
                 "tiny-vlm (default: the embedded SmolLM2-135M-Instruct); not with --api-base")
    g = p.add_argument_group("tasks and output")
    g.add_argument("--split", default="valid", help="environment split (default: valid)")
    g.add_argument("--episodes", type=EPISODES, default=DEFAULT_EPISODES,
                   help=f"episodes = task seeds SEED .. SEED+N-1 (default {DEFAULT_EPISODES})")
    g.add_argument("--seed", type=SEED, default=0,
                   help="first task seed (default 0); samplers are seeded from the task seeds")
    g.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
            help="environment option (YAML value), repeatable, e.g. dim_room=[6,6] or observation_mode=image; "
                 "overrides a run's own options. The same as env.options.KEY=VALUE, the spelling `t2po train` takes")
    g.add_argument("--out", default=None, help="output folder (default: evals/<env>-<split>-<model>)")
    g.add_argument("--quiet", action="store_true", help="print only the final table")
    g = p.add_argument_group("sampling (defaults: docs/method.md §6 validation sampling, or a run's own validation "
                             "settings)")
    g.add_argument("--temperature", type=float, default=None, help="default 0.6 (0 = greedy)")
    g.add_argument("--top-p", type=float, default=None, help="default 0.95")
    g.add_argument("--top-k", type=bounded(0, 100_000), default=None,
                   help="default 20 for local models; for APIs sent only when given (not an OpenAI parameter)")
    g.add_argument("--max-new-tokens", type=NEW_TOKENS, default=None,
                   help=f"response token budget per turn (default: the run's, else {SamplingParams().max_new_tokens})")
    g = p.add_argument_group("local models")
    g.add_argument("--batch-size", type=BATCH_SIZE, default=8,
                   help="episodes decoded together (default 8); each batch is written when it finishes")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto)")
    g.add_argument("--engine", default="hf",
                   help="generation engine: hf (default), vllm, or package.module:Class (as rollout.engine)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
            help="auto (default: bfloat16 where the hardware multiplies bf16 natively, a GPU or an AVX512-BF16/AMX "
                 "CPU, else float32), float32 or bfloat16")
    g.add_argument("--tti-budget", type=NEW_TOKENS, default=None,
                   help="TTI think-token budget B (default: the run's setting, else none)")
    g = p.add_argument_group("API models")
    g.add_argument("--api-base", default=None, metavar="URL",
                   help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    g.add_argument("--model", default=None, metavar="NAME", help="model name at the API (e.g. gpt-4o-mini)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
            help="environment variable holding the API key (default OPENAI_API_KEY); the "
                 "key is never printed or stored")
    g.add_argument("--concurrency", type=bounded(1, 256), default=4, help="episodes played in parallel (default 4)")
    g.add_argument("--request-timeout", type=bounded(0.001, 3600, float), default=120.0,
                   help="seconds per request before it is retried (default 120)")
    g.add_argument("--max-retries", type=bounded(0, 100), default=6,
                   help="retries per request on 429, 5xx, timeouts and dropped connections (default 6)")
    g.add_argument("--retry-backoff", type=bounded(0, 600, float), default=1.0,
                   help="first back-off in seconds, doubled per retry (default 1)")
    g.add_argument("--price-input", type=float, default=0.0, help="USD per 1M input tokens, for the cost column")
    g.add_argument("--price-output", type=float, default=0.0, help="USD per 1M output tokens, for the cost column")
    g.add_argument("--reasoning-api", action="store_true",
            help="request format of OpenAI reasoning models: max_completion_tokens, no temperature/top-p/top-k/seed")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, env_overrides = split_env_overrides(list(sys.argv[1:] if argv is None else argv))
    ns = parser.parse_args(argv)
    ns.env_option += env_overrides
    api = ns.api_base is not None or ns.model is not None
    if api and (ns.api_base is None or ns.model is None):
        parser.error("an API model needs both --api-base URL and --model NAME")
    if api and ns.model_path is not None:
        parser.error(f"give either a local MODEL ({ns.model_path}) or --api-base/--model, not both")
    try:
        engine_spec(ns.engine)  # an unknown engine fails before any work
        run, agent, local = _prepare(ns, api)
        created = first_missing(run.folder.path)  # removed again if this command finishes no episode
        done = run.folder.open()
    except (APIError, FileNotFoundError, ValueError, UserError) as e:
        print(f"t2po eval: {e}", file=sys.stderr)
        return 2
    pending = [s for s in run.seeds if s not in done]
    run.log(f"t2po eval: {run.title}; {len(run.seeds)} episodes -> {run.folder.path}")
    if len(pending) < len(run.seeds):
        run.log(f"resuming: {len(run.seeds) - len(pending)} finished episodes skipped, {len(pending)} to play")
    run.write_summary(done)
    try:
        if pending and api:
            _play_api(run, agent, pending, done, ns.concurrency)
        elif pending:
            _play_local(run, local, pending, done, ns)
    except APIError as e:  # a server that stopped answering: exit 3, a runtime failure (README, Reliability)
        if created is not None and not done:
            shutil.rmtree(created, ignore_errors=True)
            print(f"t2po eval: {e}", file=sys.stderr)
        else:
            print(f"t2po eval: {e} ({len(done)} finished episodes are kept in {run.folder.path}; rerun the same "
                  "command to resume)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if created is not None and not done:
            shutil.rmtree(created, ignore_errors=True)
        print(f"\nt2po eval: interrupted; {len(done)} finished episodes are kept in {run.folder.path}; rerun the same "
              "command to resume.", file=sys.stderr)
        return 130
    except BaseException:
        if created is not None and not done:
            shutil.rmtree(created, ignore_errors=True)
        raise
    run.write_summary(done)
    print("\n" + run.folder.table_file.read_text(), end="", flush=True)
    print(f"results: {run.folder.summary_file}, {run.folder.table_file}, traces in {run.folder.traces}/")
    return 0


@dataclass
class _LocalModel:
    """A local model as `t2po eval` plays it: where its weights are, and its decoding settings."""
    path: str | None
    source: ModelSource
    sampling: Any  # SamplingParams
    intervention: InterventionConfig
    max_prompt_tokens: int | None
    device: str


def _prepare(ns: argparse.Namespace, api: bool) -> tuple[EvalRun, OpenAIChatAgent | None, _LocalModel | None]:
    """Resolve the setup (without loading weights) and check the environment options."""
    options = _parse_env_options(ns.env_option, ns.env)
    agent = local = None
    if api:
        if ns.temperature is not None and ns.temperature < 0 or ns.top_p is not None and not 0 < ns.top_p <= 1:
            raise InvalidInput("--temperature must be >= 0 and --top-p in (0, 1]")
        defaults = evaluation_sampling(None)
        agent = OpenAIChatAgent(
            ns.api_base, ns.model, api_key_from_env(ns.api_key_env),
            max_tokens=ns.max_new_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if ns.temperature is None else ns.temperature,
            top_p=defaults.top_p if ns.top_p is None else ns.top_p,
            top_k=ns.top_k,
            reasoning_api=ns.reasoning_api,
            timeout=ns.request_timeout,
            retry=RetryPolicy(max_retries=ns.max_retries, backoff=ns.retry_backoff),
            price_input_per_1m=ns.price_input,
            price_output_per_1m=ns.price_output,
        )
        penalty = INVALID_ACTION_PENALTY
        model_name = ns.model
        described = agent.describe()
        setup = {"kind": "api", **described}
        sampling_note = ("reasoning-model request format (server-side sampling)" if ns.reasoning_api else
                         f"temperature {described['temperature']}, top-p {described['top_p']}"
                         + (f", top-k {described['top_k']}" if described["top_k"] is not None else ""))
        notes = [f"Model: `{ns.model}` at {agent.base_url}; {sampling_note}; up to {agent.max_tokens} tokens per turn."]
    else:
        check_device(ns.device)
        source = locate_model(ns.model_path)
        cfg = source.run_config
        if cfg is not None and cfg.env.name == ns.env:  # the run's own environment options (flags override them)
            run_options = {**cfg.env.options, **cfg.env.val_options}
            run_options.pop("split", None)
            options = {**run_options, **options}
        defaults = evaluation_sampling(cfg)
        sampling = SamplingParams(
            temperature=ns.temperature if ns.temperature is not None else defaults.temperature,
            top_p=ns.top_p if ns.top_p is not None else defaults.top_p,
            top_k=ns.top_k if ns.top_k is not None else defaults.top_k,
            max_new_tokens=ns.max_new_tokens or defaults.max_new_tokens,
        )
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0 or sampling.max_new_tokens < 1:
            raise InvalidInput("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0 and --max-new-tokens >= 1")
        intervention = intervention_for(ns.model_path, enabled=True, budget=ns.tti_budget)
        penalty = cfg.rollout.invalid_action_penalty if cfg is not None else INVALID_ACTION_PENALTY
        local = _LocalModel(ns.model_path, source, sampling, intervention, cfg.rollout.max_prompt_tokens
                            if cfg is not None else None, ns.device)
        model_name = source.short_name
        setup = {
            "kind": "local",
            "policy": source.description,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens,
            "max_prompt_tokens": local.max_prompt_tokens,
            "tti": {"patience": intervention.patience, "eps": intervention.eps, "budget": intervention.budget,
                    "alpha": intervention.alpha},
        }
        notes = [f"Model: `{source.description}`; temperature {sampling.temperature}, top-p {sampling.top_p}, top-k "
                 f"{sampling.top_k}; up to {sampling.max_new_tokens} tokens per turn; TTI on (patience "
                 f"{intervention.patience}, budget {intervention.budget or 'none'}), TDS off."]
    # building the environment once checks the split and the option values before any model work
    probe = make_env(ns.env, split=ns.split, **options)
    # Search QA: results are only comparable on the same corpus, so the setup names it (and a
    # results folder is not mixed across corpora)
    corpus = probe.describe().get("corpus")
    probe.close()
    if local is not None and getattr(probe, "observation_mode", "text") != "text":
        from t2po.models import reads_images
        from t2po.vlm import VLM_EXAMPLES

        if reads_images(source.path if source.checkpoint is None else source.base) is False:
            raise InvalidInput(f"{ns.env} with observation_mode={probe.observation_mode} shows images, which need a "
                               "vision-language model "
                             f"as MODEL ({VLM_EXAMPLES}); {source.description} is text-only. Or pass --env-option "
                             "observation_mode=text")
    setup.update({"env": ns.env, "split": ns.split, "env_options": options, "invalid_action_penalty": penalty,
                  **({"corpus": corpus} if corpus else {})})
    notes.append(f"Environment: `{ns.env}`, split `{ns.split}`"
                 + (f", options `{json.dumps(_json_safe(options))}`" if options else "") + ".")
    if corpus:
        notes.append(f"Corpus: `{corpus['name']}` ({corpus['num_passages']:,} passages, `{corpus['path']}`, sha256 "
                     f"{corpus['sha256'][:12]}).")
    out = Path(ns.out) if ns.out else Path("evals") / _safe_name(f"{ns.env}-{ns.split}-{model_name}")
    # the path rule (t2po/paths.py); an earlier evaluation (its eval.json) is continued, any other non-empty folder
    # refused
    new_folder(out, "--out", own_marker="eval.json")
    run = EvalRun(ns.env, ns.split, options, list(range(ns.seed, ns.seed + ns.episodes)), ResultsFolder(out, setup),
                  f"{ns.env} ({ns.split}): {model_name}", notes, ns.price_input if api else 0.0, ns.price_output if api
                  else 0.0, ns.quiet)
    return run, agent, local


def _play_local(run: EvalRun, local: _LocalModel, pending: list[int], done: dict[int, dict],
                ns: argparse.Namespace) -> None:
    """`collect_rollouts` (TTI on, TDS off) over batches of `--batch-size` pending episodes."""
    from t2po.engines import engine_for_policy
    from t2po.progress import Progress, silence_library_progress

    silence_library_progress()
    model, tokenizer, _ = load_local_model(local.path, dtype=ns.dtype, device=local.device)
    engine = engine_for_policy(ns.engine, model, tokenizer)
    with run.make_env() as env:
        for start in range(0, len(pending), ns.batch_size):
            batch = pending[start : start + ns.batch_size]
            t0 = time.monotonic()
            desc = f"[episodes {start + 1}-{start + len(batch)} of {len(pending)}]"
            with Progress(len(batch), desc, "episode", disable=run.quiet) as bar:  # a batch can take minutes
                settings = RolloutSettings(invalid_action_penalty=run.folder.setup["invalid_action_penalty"],
                                           max_prompt_tokens=local.max_prompt_tokens)
                result = collect_rollouts(EnginePolicy(engine, local.sampling, local.intervention), env,
                                          batch, settings,
                                          seed=batch[0], progress=bar)
            share = (time.monotonic() - t0) / len(batch)  # an episode's share of the batch's wall time
            for episode in result.episodes:
                run.finish_episode(done, *episode_files(episode, tokenizer, run.env_name, run.split, share))


def _play_api(run: EvalRun, agent: OpenAIChatAgent, pending: list[int], done: dict[int, dict],
              concurrency: int) -> None:
    """Episodes in `concurrency` threads, one environment each; results are written by this thread
    as episodes finish. A fatal API error or Ctrl-C stops the others at their next turn."""
    workers = min(concurrency, len(pending))
    envs: queue.Queue = queue.Queue()
    for _ in range(workers):
        envs.put(run.make_env())
    stop = threading.Event()
    penalty = run.folder.setup["invalid_action_penalty"]
    policy = APIPolicy(agent, stopping=stop.is_set)

    def play(seed: int) -> tuple[dict, dict, list[dict]]:
        env = envs.get()
        try:
            start = time.monotonic()
            # one episode per call, its request seeds from its task seed; the turns as in training
            result = collect_rollouts(policy, env, [seed], RolloutSettings(invalid_action_penalty=penalty), seed=seed)
            return episode_files(result.episodes[0], None, run.env_name, run.split, time.monotonic() - start)
        finally:
            envs.put(env)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="t2po-eval")
    try:
        running: set[Future] = {pool.submit(play, s) for s in pending}
        while running:
            finished, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                run.finish_episode(done, *future.result())
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        while not envs.empty():
            envs.get().close()


if __name__ == "__main__":
    sys.exit(main())
