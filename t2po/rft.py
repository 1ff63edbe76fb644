"""Cold start (docs/method.md §5): rejection-sampling data collection (`t2po rft collect`); the multi-turn
SFT on what it collects is `t2po sft` (t2po/sft.py).

    t2po rft collect sokoban --policy expert --episodes 64 --out data/sokoban.jsonl
    t2po rft collect sokoban --policy runs/my-run --episodes 256 --threshold 0.8 --out data/rft.jsonl
    t2po sft data/rft.jsonl --out models/sokoban-sft            # LoRA, merged into a full model folder
    t2po train model.path=models/sokoban-sft                    # RL starts from the SFT model

`collect` plays a policy on training tasks and keeps the episodes whose task score exceeds the
threshold (score = the `score` metric where the environment reports one, else 1 for a win and 0
otherwise). Policies: `expert` (the environment's solver / walkthrough / oracle), a local model,
a run folder or checkpoint, or the embedded default. Model episodes keep the exact token ids the
engine sampled; SFT trains on those ids (the prompt is re-rendered with the same chat template as
at rollout time, so the tokens are identical).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2po.bounds import EPISODES, NEW_TOKENS, SEED
from t2po.errors import UserError
from t2po.paths import new_file
from t2po.sft import Conversation, play_expert_episodes, save_conversations


def episode_score(won: bool, metrics: dict) -> float:
    score = metrics.get("score")
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else float(won)


def _environment(env: str | None, preset: str | None, options: dict) -> tuple[str, dict]:
    """The environment and options to collect on: ENV, or the preset's (the options given win)."""
    if preset is None:
        if env is None:
            raise UserError("name the environment (e.g. `t2po rft collect sokoban`) or a "
                            "training preset (--preset default).")
        return env, options
    from t2po.config import load_config

    try:
        cfg = load_config(preset)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if env is not None and env != cfg.env.name:
        raise UserError(f"preset {preset!r} trains on {cfg.env.name!r}, not {env!r}; drop ENV or pick another preset.")
    return cfg.env.name, {**cfg.env.options, **options}


def collect(env_name: str, policy: str, episodes: int, threshold: float, out: Path, env_options: dict, seed: int = 0,
            group_size: int = 1, batch_size: int = 16, max_new_tokens: int = 128, temperature: float = 1.0,
            engine_name: str = "hf") -> dict:
    from t2po.envs import make_env

    env = make_env(env_name, **env_options)
    seeds = [seed + k for k in range(episodes)]
    kept: list[Conversation] = []
    played = 0
    try:
        if policy == "expert":
            convs = play_expert_episodes(env, seeds)
            played = len(convs)
            kept = [c for c in convs if episode_score(c.won, c.metrics) > threshold]
        else:
            from t2po.engines import engine_for_policy
            from t2po.engines.base import InterventionConfig, SamplingParams
            from t2po.policies import EnginePolicy
            from t2po.locate import load_local_model
            from t2po.rollout import RolloutSettings, collect_rollouts

            model, tokenizer, description = load_local_model(None if policy == "default" else policy)
            player = EnginePolicy(engine_for_policy(engine_name, model, tokenizer),
                                  SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens),
                                  InterventionConfig())
            for start in range(0, len(seeds), batch_size):
                result = collect_rollouts(player, env, seeds[start : start + batch_size], RolloutSettings(group_size),
                                          seed=seed + start)
                for ep in result.episodes:
                    played += 1
                    if episode_score(ep.won, ep.metrics) <= threshold:
                        continue
                    # exact engine ids; the decoded prompt is kept for people reading the file
                    steps = [{"prompt": tokenizer.decode(s.prompt_ids), "response": t.response_text,
                              "prompt_ids": s.prompt_ids,
                              "response_ids": s.response_ids, **({"image": t.image} if t.image is not None else {})}
                             for s, t in zip(ep.samples, ep.traces)]
                    kept.append(Conversation(env_name, ep.seed, steps, ep.total_reward, ep.won, ep.metrics,
                                             source=description))
    finally:
        env.close()
    save_conversations(kept, out)
    stats = {"env": env_name, "policy": policy, "episodes": played, "kept": len(kept),
             "threshold": threshold, "out": str(out)}
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2po rft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="play a policy on training tasks and keep the successful episodes")
    c.add_argument("env", nargs="?", help="environment name (see `t2po envs`); optional with --preset")
    c.add_argument("--preset", default=None,
                   help="take the environment and its options from a training preset (e.g. default, "
                   "alfworld-cpu), so the collected prompts are the ones `t2po train PRESET` "
                   "renders; --env-option still overrides")
    c.add_argument("--policy", default="expert", help="expert | default | a model folder | a run folder or checkpoint")
    c.add_argument("--episodes", type=EPISODES, default=64, help="tasks played, 1 to 100000 (default 64)")
    c.add_argument("--threshold", type=float, default=0.8, help="keep episodes whose task score is above this")
    c.add_argument("--out", required=True,
                   help="output .jsonl or .parquet (a new file, or one an earlier collect wrote)")
    c.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                   help="environment option (YAML value), repeatable; the same as env.options.KEY=VALUE, "
                        "the spelling `t2po train` takes")
    c.add_argument("--seed", type=SEED, default=0)
    c.add_argument("--max-new-tokens", type=NEW_TOKENS, default=128)
    c.add_argument("--engine", default="hf",
                   help="generation engine of a model policy: hf (default), vllm, or package.module:Class")
    from t2po.envs import env_option_errors, parse_env_options, split_env_overrides

    argv, env_overrides = split_env_overrides(list(sys.argv[1:] if argv is None else argv))
    ns = parser.parse_args(argv)
    ns.env_option += env_overrides

    try:
        given = parse_env_options(ns.env_option)
    except ValueError as e:
        raise UserError(str(e)) from None
    new_file(ns.out, "--out", (".jsonl", ".parquet"))  # the path rule (t2po/paths.py)
    env_name, options = _environment(ns.env, ns.preset, given)
    errors = env_option_errors(env_name, options, "--env-option ")
    if errors:
        raise UserError(errors[0])
    from t2po.engines import engine_spec

    engine_spec(ns.engine)  # an unknown engine fails before any work
    stats = collect(env_name, ns.policy, ns.episodes, ns.threshold, Path(ns.out), options, ns.seed,
                    max_new_tokens=ns.max_new_tokens,
                    engine_name=ns.engine)
    print(f"kept {stats['kept']} of {stats['episodes']} episodes (score > {ns.threshold}) -> {ns.out}")
    return 0
