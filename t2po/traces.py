"""Rollout traces: episodes written for people to read (docs/method.md §2-§3 show in them: where TTI forced
tokens, which responses TDS regenerated and discarded).

    episode_trace(episode, tokenizer)   one episode (`t2po.rollout.Episode`: its `StepSample`s and `StepTrace`s)
                                        as a JSON-ready dict: a line of the trainer's traces/iter_NNNNNN.jsonl,
                                        the header and turn lines of `t2po eval`'s traces/seed-NNNNNN.jsonl
    trace_sample(episodes, k)           the k episodes of a batch that are traced, spread over its tasks
    log_mlflow_trace(mlflow, trace, ...) one episode trace as an MLflow trace of a run (`t2po.tracking.MlflowTracker`)

The MLflow form: one trace per episode, tagged with its phase (train / validation), iteration and task so
that the trace list filters on them; one span per turn with the observation and the prompt as code blocks
(the UI renders text as Markdown, which would join a Sokoban grid's lines), the response with the
TTI-forced tokens marked `[[forced: </think>]]`, and the token ids as attributes; under it the turn's
generation call, each TDS redraw (the response it discarded marked `t2po.discarded`) and the environment
step, at the times they really ran.
"""

from __future__ import annotations

import math
from typing import Any


def trace_sample(episodes: list, k: int) -> list:
    """`k` episodes spread evenly over the batch, so that the traces show different tasks (the batch
    is ordered task by task) instead of `k` attempts at the first one."""
    if k <= 0 or not episodes:
        return []
    if k >= len(episodes):
        return list(episodes)
    return [episodes[(j * len(episodes)) // k] for j in range(k)]


def _forced_spans(ids: list[int], forced: list[bool], tokenizer: Any) -> list[dict]:
    """Contiguous runs of TTI-forced tokens: token position, length and decoded text (e.g. `</think>`)."""
    spans = []
    k = 0
    while k < len(forced):
        if forced[k]:
            end = k
            while end < len(forced) and forced[end]:
                end += 1
            spans.append({"position": k, "tokens": end - k, "text": tokenizer.decode(ids[k:end])})
            k = end
        else:
            k += 1
    return spans


def _marked(ids: list[int], forced: list[bool], tokenizer: Any) -> str:
    """The response text with each run of TTI-forced tokens shown as `[[forced: ...]]`."""
    parts, k = [], 0
    while k < len(ids):
        end = k
        while end < len(ids) and forced[end] == forced[k]:
            end += 1
        text = tokenizer.decode(ids[k:end])
        parts.append(f"[[forced: {text}]]" if forced[k] else text)
        k = end
    return "".join(parts)


def episode_trace(episode: Any, tokenizer: Any = None) -> dict:
    """One episode (`t2po.rollout.Episode`) as a JSON-ready dict: a line of the trainer's
    `traces/iter_NNNNNN.jsonl`, and the header and turn lines of `t2po eval`'s `traces/seed-NNNNNN.jsonl`.

    Per step: the observation, the prompt and the response (for a token-level policy both decoded
    and as token ids, the ids being the engine's, as trained on; for a text policy, the texts), the
    token counts, where TTI forced tokens (`forced`: position, length, text) and how often TDS
    regenerated the turn (`tds_resampled`), the turn score, the parsed action and its validity, the
    environment reward and the reward after the invalid-action penalty; for an API model also the
    finish reason, the requests and retries it took, and its latency."""
    steps = []
    for s, t in zip(episode.samples, episode.traces):
        usage = dict(t.usage)
        steps.append({
            "step": s.step,
            "observation": episode.observations[s.step] if s.step < len(episode.observations) else None,
            "prompt": tokenizer.decode(s.prompt_ids) if s.prompt_ids else t.prompt_text,
            "prompt_ids": list(s.prompt_ids),
            "response": t.response_text,
            "response_ids": list(s.response_ids),
            "prompt_tokens": usage.pop("prompt_tokens", len(s.prompt_ids)),
            "completion_tokens": usage.pop("completion_tokens", len(s.response_ids)),
            "forced": _forced_spans(s.response_ids, s.forced_mask, tokenizer) if any(s.forced_mask) else [],
            "response_marked": _marked(s.response_ids, s.forced_mask, tokenizer) if tokenizer is not None
                      and any(s.forced_mask) else t.response_text,
            "tti_triggers": dict(t.tti_triggers),
            "think_length": t.think_length,
            "tds_resampled": t.resampled,
            # the responses TDS replaced (docs/method.md §3), kept to be seen, never trained on
            "tds_discarded": [{"response": d["text"], "response_ids": list(d["token_ids"]),
                               "turn_score": _finite(d["turn_score"]),
                               "forced": _forced_spans(d["token_ids"], d["forced"], tokenizer)} for d in t.discarded],
            "turn_score": _finite(s.turn_score),
            "action": t.action,
            "valid": s.valid,
            "invalid_reason": t.invalid_reason,
            "env_reward": s.env_reward,
            "reward": s.reward,
            "done": s.done,
            "finish_reason": t.finish_reason,
            "timing": {k: list(v) if k != "tds" else [list(span) for span in v] for k, v in t.timing.items()},
            **usage,
        })
    return {
        "traj_id": episode.traj_id,
        "group_id": episode.group_id,
        "seed": episode.seed,
        "won": episode.won,
        "truncated": episode.truncated,
        "total_reward": episode.total_reward,
        "metrics": {k: v for k, v in episode.metrics.items() if isinstance(v, (int, float, str, bool))},
        "final_observation": episode.observations[-1] if episode.observations else None,
        "steps": steps,
    }


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _code(text: str | None) -> str | None:
    """`text` as a fenced code block: the trace UI renders strings as Markdown, which joins lines and
    turns `#` rows of a grid into headings."""
    if text is None:
        return None
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text}\n{fence}"


def _rounded(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


def log_mlflow_trace(mlflow: Any, trace: dict, run_id: str, phase: str, step: int) -> None:
    """One episode (an `episode_trace` dict) as one MLflow trace: the episode span (AGENT), a span per
    turn (LLM) and under it the generation call, each TDS redraw (the response it discarded, attribute
    `t2po.discarded`) and the environment step (TOOL), with the times recorded during the rollout
    (`StepTrace.timing`; a trace without them gets the logging time)."""
    from mlflow.tracing.constant import TraceMetadataKey

    steps = trace["steps"]
    times = [t for turn in steps for t in (turn.get("timing") or {}).values() if t and isinstance(t[0], int)]
    times += [t for turn in steps for t in (turn.get("timing") or {}).get("tds", [])]
    name = f"{phase} {step}: task {trace['seed']}, episode {trace['traj_id']}"
    root = mlflow.start_span_no_context(
        name, span_type="AGENT", start_time_ns=min((t[0] for t in times), default=None),
        inputs={"task_seed": trace["seed"],
                "first_observation": _code(steps[0]["observation"] if steps else trace["final_observation"])},
        attributes={"t2po.phase": phase, "t2po.step": step, "t2po.group_id": trace["group_id"],
                    "t2po.traj_id": trace["traj_id"],
                    "t2po.metrics": trace["metrics"]},
        # what the trace list filters on; SOURCE_RUN is what `search_traces(run_id=...)` and the run's Traces tab select
        # on
        tags={"t2po.phase": phase, "t2po.step": str(step), "t2po.iteration" if phase == "train"
              else "t2po.validation_step": str(step),
              "t2po.task": str(trace["seed"]), "t2po.won": str(trace["won"]).lower()},
        metadata={TraceMetadataKey.SOURCE_RUN: run_id})
    for turn in steps:
        timing = turn.get("timing") or {}
        generate, env_step, redraws = timing.get("generate"), timing.get("env_step"), timing.get("tds", [])
        span = mlflow.start_span_no_context(
            f"turn {turn['step']}", span_type="LLM", parent_span=root, start_time_ns=generate[0] if generate else None,
            inputs={"observation": _code(turn["observation"]), "prompt": _code(turn["prompt"])})
        span.set_outputs({"response": _code(turn.get("response_marked", turn["response"])), "action": turn["action"],
                          "reward": _rounded(turn["reward"])})
        span.set_attributes({f"t2po.{k}": _rounded(turn[k]) for k in (
            "valid", "invalid_reason", "reward", "env_reward", "done", "turn_score", "think_length", "tti_triggers",
            "forced", "tds_resampled", "finish_reason") if k in turn})
        # after the text
        span.set_attributes({"t2po.prompt_ids": turn["prompt_ids"], "t2po.response_ids": turn["response_ids"]})
        # the calls that produced each discarded response: the generation, then the redraws before the last
        sources = [generate, *redraws]
        for k, discarded in enumerate(turn.get("tds_discarded", [])):
            when = sources[k] if k < len(sources) and sources[k] else None
            child = mlflow.start_span_no_context(
                f"discarded by TDS ({k + 1})", span_type="LLM", parent_span=span, start_time_ns=when[0]
                                                 if when else None,
                attributes={"t2po.discarded": True, "t2po.turn_score": _rounded(discarded["turn_score"]),
                            "t2po.forced": discarded["forced"]})
            child.set_outputs({"response": _code(discarded["response"]), "response_ids": discarded["response_ids"]})
            child.end(end_time_ns=when[1] if when else None)
        for label, when in [("generation", generate), *[(f"TDS redraw {k + 1}", r) for k, r in enumerate(redraws)],
                            ("environment step", env_step)]:
            if when:
                mlflow.start_span_no_context(label, span_type="TOOL" if label == "environment step" else "LLM",
                                             parent_span=span,
                                             start_time_ns=when[0]).end(end_time_ns=when[1])
        span.end(end_time_ns=env_step[1] if env_step else None)
    root.end(outputs={"won": trace["won"], "total_reward": _rounded(trace["total_reward"]),
                      "truncated": trace["truncated"],
                      "final_observation": _code(trace["final_observation"])},
             end_time_ns=max((t[1] for t in times), default=None))
