"""Search QA: answer an open-domain question by searching a Wikipedia corpus (Search-R1 / verl-agent).

Each turn the model reasons in `<think>...</think>` and then either searches, `<search>query</search>`
(the next observation is the top-k passages inside `<information>...</information>`), or answers,
`<answer>...</answer>` (the episode ends; reward 1.0 if the answer exactly matches a golden answer after
Search-R1 normalisation, else 0.0). An episode has at most `max_steps` = 4 turns; a search in the last
turn ends it unanswered (reward 0), as in the reference.

Format checking follows verl-agent's search projection: the response is cut after the first
`</search>` (or, if none, the first `</answer>`); the first `<search>` block, else the first `<answer>`
block, is the action. The response is invalid (penalised by the trainer, docs/method.md §4) when it has no
complete block, has both `<search>` and `<answer>` tags, or repeats either tag; an invalid response
with a block still acts on it. Unlike the reference, an empty `<search></search>` is invalid and is
not sent to the server. An invalid turn without a block (and an empty search) gets an empty
observation, as in the reference. The `<think>` span is asked for by the prompt but not checked
(the reference does not check it either).

The prompt is verl-agent's search template: the question, then the last `history_length` steps as
`Step n:<search>query</search> <information>...</information>`. The GiGPO anchor observation is the
current observation alone: the question at reset, then the `<information>` block of the last search.

Retrieval goes over HTTP to a retrieval server (`server.py`, Search-R1 contract). With `retriever_url`
unset the environment starts one in-process, in a background thread on a free loopback port, serving
`corpus` (default: the corpus built from the shared data) with `retriever` (default BM25); the trainer
and every evaluation then use the same real HTTP path. `describe()` and each episode's metrics name
the corpus, because success rates are only comparable on the same corpus.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from t2po.envs import register_env
from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction
from t2po.envs.search.data import (
    DATA_SOURCES,
    SPLITS,
    SearchQuestion,
    exact_match,
    load_shared_questions,
    question_pool,
)
from t2po.envs.search.server import BackgroundServer, RetrievalClient, load_retriever
from t2po.errors import InvalidInput

logger = logging.getLogger(__name__)

SEARCH_TEMPLATE_NO_HIS = """You are an expert agent tasked with answering the given question step-by-step.
Your question: {task_description}

Now it's your turn to respond for the current step.
You should first conduct reasoning process. This process MUST be enclosed within <think> </think> tags. 
After completing your reasoning, choose only one of the following actions (do not perform both):
(1) If you find you lack some knowledge, you can call a search engine to get more external information using format: \
<search> your query </search>.
(2) If you have enough knowledge to answer the question confidently, provide your final answer within <answer> \
</answer> tags, without detailed illustrations. For example, <answer>Beijing</answer>.
"""

SEARCH_TEMPLATE = """You are an expert agent tasked with answering the given question step-by-step.
Your question: {task_description}

Prior to this step, you have already taken {step_count} step(s). Below is the interaction history where <search> \
</search> wrapped your past search queries and <information> </information> wrapped the corresponding search results \
returned by the external search engine. History:
{memory_context}

Now it's your turn to respond for the current step.
You should first conduct reasoning process. This process MUST be enclosed within <think> </think> tags. 
After completing your reasoning, choose only one of the following actions (do not perform both):
(1) If you find you lack some knowledge, you can call a search engine to get more external information using format: \
<search> your query </search>.
(2) If you have enough knowledge to answer the question confidently, provide your final answer within <answer> \
</answer> tags, without detailed illustrations. For example, <answer>Beijing</answer>.
"""

_TAG = re.compile(r"<(/?)(search|answer)>", re.IGNORECASE)
NO_RESULTS = "No search results found."


def parse_search_action(response: str) -> ParsedAction:
    """verl-agent's search projection for one response (see the module docstring). The action is
    `<search>query</search>`, `<answer>text</answer>` or "" (no block). Never raises.

    One scan over the tags (the projection's `<search>(.*?)</search>` searches rescan the rest of
    the text from every opening tag: quadratic on "<answer>" * N)."""
    text = response if isinstance(response, str) else ""
    tags = [(m.start(), m.end(), m.group(1) == "/", m.group(2).lower()) for m in _TAG.finditer(text)]
    # cut after the first closing tag (</search> first) so that a hallucinated continuation is not
    # read as the action
    cut = len(text)
    for name in ("search", "answer"):
        closing = next((end for _, end, close, tag in tags if close and tag == name), None)
        if closing is not None:
            cut = closing
            break
    action = empty = None
    for name in ("search", "answer"):
        opening = next(((start, end) for start, end, close, tag in tags if not close and tag == name
                        and end <= cut), None)
        if opening is None:
            continue
        closing = next((start for start, end, close, tag in tags if close and tag == name and start >= opening[1]
                        and end <= cut), None)
        if closing is not None:
            content = text[opening[1] : closing].strip()
            action, empty = f"<{name}>{content}</{name}>", name == "search" and not content
            break
    if action is None:
        return ParsedAction("", False, "no complete <search>...</search> or <answer>...</answer> block")
    n_search = sum(1 for _, _, close, tag in tags if not close and tag == "search")
    n_answer = sum(1 for _, _, close, tag in tags if not close and tag == "answer")
    if n_search and n_answer:
        return ParsedAction(action, False, "both <search> and <answer> in one response")
    if n_search > 1 or n_answer > 1:
        return ParsedAction(action, False, "more than one <search> or <answer> tag")
    if empty:
        return ParsedAction(action, False, "empty search query")
    return ParsedAction(action, True)


def format_information(hits: list[dict]) -> str:
    """Retrieved passages as the observation, in Search-R1's layout:
    `<information>Doc 1(Title: "T") text\\nDoc 2(...) ...</information>`."""
    if not hits:
        return f"<information>{NO_RESULTS}</information>"
    lines = []
    for rank, hit in enumerate(hits, 1):
        title, _, text = hit["document"]["contents"].partition("\n")
        lines.append(f"Doc {rank}(Title: {title}) {text}")
    return "<information>" + "\n".join(lines) + "</information>"


def aggregate_metrics(episode_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Success rate overall and per data source (`success/nq`, `success/hotpotqa`), episode counts,
    mean searches per episode, and the corpus the episodes used."""
    if not episode_metrics:
        return {}
    out: dict[str, Any] = {"success": sum(m["success"] for m in episode_metrics) / len(episode_metrics),
                           "episodes": len(episode_metrics),
                           "num_searches": sum(m["num_searches"] for m in episode_metrics) / len(episode_metrics)}
    for source in sorted({m["data_source"] for m in episode_metrics}):
        members = [m for m in episode_metrics if m["data_source"] == source]
        out[f"success/{source}"] = sum(m["success"] for m in members) / len(members)
        out[f"episodes/{source}"] = len(members)
    corpora = sorted({m["corpus"] for m in episode_metrics})
    out["corpus"] = corpora[0] if len(corpora) == 1 else corpora
    return out


@dataclass
class _Episode:
    question: SearchQuestion
    turns: int = 0
    searches: int = 0
    done: bool = False


@register_env("search")
class SearchEnv(BatchEnv):
    """Search QA over a retrieval server.

    Options:
    - `retriever_url` (None): base URL of a running retrieval server (`t2po serve-retriever`), e.g.
      `http://127.0.0.1:8000`. None starts an in-process server on a free loopback port.
    - `corpus` (None) and `retriever` ("bm25"): what the in-process server serves (a wiki-18 JSONL
      file, default the corpus built from the shared data; "bm25" or "dense"). Errors when combined
      with `retriever_url`, since a running server decides its own corpus.
    - `topk` (3): passages per search, as in Search-R1.
    - `split` ("train" | "validation", "valid" is an alias): disjoint by a hash of the normalised question
    (`data.split_of`).
    - `data_sources` (["nq", "hotpotqa"]): which questions to draw.
    - `max_steps` (4) and `history_length` (4): the paper's Search settings (docs/method.md §6).
    - `timeout` (30.0): seconds per retrieval request; failures are retried 3 times with back-off,
      then the step raises `RetrieverUnavailableError`.
    - `data_dir` (None): folder with the question files (default `../shared/data/search`).

    Task `seed` is question `seed % N` of the split's question pool (a fixed pseudo-random order).
    """

    check_admissible = False
    max_steps = 4
    option_ranges = {**BatchEnv.option_ranges, "topk": (1, 100)}  # passages per search, all shown in the prompt
    history_length = 4

    def __init__(self, retriever_url: str | None = None, topk: int = 3, split: str = "train",
                 data_sources: list[str] | tuple[str, ...] = DATA_SOURCES, max_steps: int = 4, history_length: int = 4,
                 timeout: float = 30.0, data_dir: str | None = None, corpus: str | None = None,
                 retriever: str = "bm25"):
        if topk < 1:
            raise InvalidInput(f"topk must be at least 1, got {topk}.")
        if max_steps < 1:
            raise InvalidInput(f"max_steps must be at least 1, got {max_steps}.")
        split = "validation" if split == "valid" else split  # the trainer's generic name
        if split not in SPLITS:
            raise InvalidInput(f"Unknown split {split!r}; use one of {SPLITS}.")
        if not data_sources or set(data_sources) - set(DATA_SOURCES):
            raise InvalidInput(f"data_sources must be a non-empty subset of {DATA_SOURCES}, got {data_sources!r}.")
        if retriever_url is not None and (corpus is not None or retriever != "bm25"):
            raise InvalidInput("The options corpus/retriever configure the in-process retrieval server; with "
                             "retriever_url set, the running server decides its corpus. Drop one or the other.")
        self.topk, self.split, self.max_steps, self.history_length = topk, split, max_steps, history_length
        self.data_sources = tuple(data_sources)
        self._server: BackgroundServer | None = None
        if retriever_url is None:
            self._server = BackgroundServer(load_retriever(corpus, retriever, data_dir), topk=topk)
            retriever_url = self._server.url
        self.retriever_url = retriever_url
        self.client = RetrievalClient(retriever_url, timeout=timeout)
        try:
            self.server_info = self.client.health()  # before the slower question loading: fail fast
            self.questions = question_pool(load_shared_questions(data_dir), split, self.data_sources)
        except Exception:
            self.close()
            raise
        if not self.questions:
            self.close()
            raise InvalidInput(f"No {split} questions for data sources {self.data_sources}.")
        self.corpus_name = self.server_info["corpus"]["name"]
        logger.info("Search env (%s, %d questions) retrieves from %s: corpus %s", split, len(self.questions),
                    retriever_url, self.server_info["corpus"])
        self._episodes: list[_Episode] = []

    def describe(self) -> dict[str, Any]:
        """The setup every reported result should carry: corpus (name, path, passages, sha256),
        retriever, URL, split and question counts."""
        return {"env": "search", "split": self.split, "data_sources": list(self.data_sources),
                "num_questions": len(self.questions), "topk": self.topk, "max_steps": self.max_steps,
                "history_length": self.history_length, "retriever_url": self.retriever_url,
                "in_process_server": self._server is not None, "corpus": self.server_info["corpus"],
                "retriever": self.server_info["retriever"]}

    def task_description(self, index: int) -> str:
        """The question instance `index` is answering."""
        return self._episodes[index].question.question

    def reset(self, seeds: list[int]) -> list[EnvState]:
        self._episodes = [_Episode(self.questions[seed % len(self.questions)]) for seed in seeds]
        return [EnvState(observation=ep.question.question,
                         info={"question_id": ep.question.id, "data_source": ep.question.data_source})
                for ep in self._episodes]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        if len(actions) != len(self._episodes):
            raise ValueError(f"step got {len(actions)} actions for {len(self._episodes)} instances.")
        states: list[EnvState | None] = [None] * len(actions)
        pending: list[tuple[int, str]] = []  # (instance, query) to retrieve in one batch
        for i, (episode, action) in enumerate(zip(self._episodes, actions)):
            if action is None:
                continue
            if episode.done:
                raise ValueError(f"Instance {i} is done; pass None for it.")
            episode.turns += 1
            # the action is parse_action's output; parsing again is a no-op on it and makes step
            # accept a raw response too
            act = parse_search_action(action).action
            content = act[act.index(">") + 1: act.rindex("<")].strip() if act else ""
            if act.startswith("<answer>"):
                reward = exact_match(content, episode.question.golden_answers)
                states[i] = self._finish(episode, reward, answer=content)
            elif episode.turns >= self.max_steps:
                states[i] = self._finish(episode, 0.0, answer=None)
            elif content:
                pending.append((i, content))
            else:  # no block or an empty query: nothing to search
                states[i] = EnvState(observation="", info={"query": None})
        if pending:
            results = self.client.retrieve([query for _, query in pending], self.topk)
            for (i, query), hits in zip(pending, results):
                self._episodes[i].searches += 1
                states[i] = EnvState(observation=format_information(hits),
                                     info={"query": query, "retrieved_ids": [h["document"]["id"] for h in hits]})
        return states

    def _finish(self, episode: _Episode, reward: float, answer: str | None) -> EnvState:
        episode.done = True
        won = reward >= 1.0
        question = episode.question
        return EnvState(observation="", reward=reward, done=True, won=won,
                        metrics={"success": int(won), "data_source": question.data_source,
                                 "num_searches": episode.searches, "num_turns": episode.turns,
                                 "corpus": self.corpus_name},
                        info={"answer": answer, "golden_answers": list(question.golden_answers)})

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        return parse_search_action(response)

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        """`history` holds (observation, action) pairs with the actions as `parse_action` returned
        them; step n of the prompt pairs action n with the observation it produced."""
        question = self.task_description(index)
        if not history or self.history_length <= 0:
            return SEARCH_TEMPLATE_NO_HIS.format(task_description=question)
        observations = [obs for obs, _ in history[1:]] + [state.observation]
        start = max(0, len(history) - self.history_length)
        memory = "\n".join(f"Step {n + 1}:{history[n][1]} {observations[n]}\n" for n in range(start, len(history)))
        return SEARCH_TEMPLATE.format(task_description=question, step_count=len(history), memory_context=memory)

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None
        if getattr(self, "_server", None) is not None:
            self._server.stop()
            self._server = None
