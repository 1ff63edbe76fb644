"""The WebShop environment behind t2po's `BatchEnv` protocol, as verl-agent feeds it to the model.

- Observation: WebShop's "text" page with everything up to the instruction removed and each part
  quoted (verl-agent's `format_obs`): "'Back to Search' [SEP] 'Page 1 (Total results: 50)' [SEP] ...";
  `observation_mode="text_rich"` gives WebShop's rich text instead. The observation is also the
  GiGPO anchor.
- Prompt: verl-agent's WEBSHOP_TEMPLATE (WEBSHOP_TEMPLATE_NO_HIS at the first step, and when the
  prompt would exceed 13,000 characters, as verl-agent does) with the last `history_length`
  (observation, action) pairs and the available actions.
- Actions: `search[<query>]` (any query, when the page has a search box) and `click[<element>]` for
  the page's clickables; `check_admissible` flags anything else as invalid (the shop ignores it).
- Reward (docs/method.md §4, verl-agent): 10 when the purchase scores 1 (WebShop's reward, `reward.py`), else
  0; the episode ends at "Buy Now" or after `max_steps` steps. Final metrics: `success` (0/1) and
  `score` (the purchase's WebShop reward in [0, 1]; 0 without a purchase). The paper reports
  score as mean(score) x 100.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from t2po.envs import register_env
from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction, parse_think_action, reference_think_action
from t2po.envs.webshop.catalog import SPLITS, Catalog, Goal, generated_catalog, load_official_catalog
from t2po.envs.webshop.engine import (INDEX_CACHE_MIN_PRODUCTS, Page, SearchIndex, Shop, ShopSession, parse_action,
                                      rich_text, simple_text)
from t2po.envs.webshop.reward import (FUZZY_MATCH_THRESHOLD, TITLE_NOUN_MODES, goal_option_list, normalize_color,
                                      token_set_ratio)
from t2po.errors import InvalidInput

SUCCESS_REWARD = 10.0  # docs/method.md §4: 10 for success in WebShop
OBSERVATION_MODES = ("text", "text_rich")
PROMPT_CHAR_LIMIT = 13000  # verl-agent falls back to the no-history template above this
SEARCH_PLACEHOLDER = "search[<your query>]"

# verl-agent's prompts/webshop.py (the "e‑commerce" hyphen is U+2011, as there)
WEBSHOP_TEMPLATE_NO_HIS = """
You are an expert autonomous agent operating in the WebShop e\u2011commerce environment. 
Your task is to: {task_description}.
Your current observation is: {current_observation}.
Your admissible actions of the current situation are: 
[
{available_actions}
].

Now it's your turn to take one action for the current step.
You should first reason step-by-step about the current situation, then think carefully which admissible action best \
advances the shopping goal. This reasoning process MUST be enclosed within <think> </think> tags. 
Once you've finished your reasoning, you should choose an admissible action for current step and present it within \
<action> </action> tags.
"""

WEBSHOP_TEMPLATE = """
You are an expert autonomous agent operating in the WebShop e\u2011commerce environment.
Your task is to: {task_description}.
Prior to this step, you have already taken {step_count} step(s). Below are the most recent {history_length} \
observations and the corresponding actions you took: {action_history}
You are now at step {current_step} and your current observation is: {current_observation}.
Your admissible actions of the current situation are: 
[
{available_actions}
].

Now it's your turn to take one action for the current step.
You should first reason step-by-step about the current situation, then think carefully which admissible action best \
advances the shopping goal. This reasoning process MUST be enclosed within <think> </think> tags. 
Once you've finished your reasoning, you should choose an admissible action for current step and present it within \
<action> </action> tags.
"""

_PRICE_CLAUSE = re.compile(r", and price lower than [\d.]+ dollars$")


def default_cache_dir() -> Path:
    """Where large generated catalogs and search indexes are kept: $T2PO_CACHE or ~/.cache/t2po."""
    return Path(os.environ.get("T2PO_CACHE") or Path.home() / ".cache" / "t2po")


@lru_cache(maxsize=4)
def open_shop(
    data_dir: str | None = None,
    use_small: bool = True,
    human_goals: bool = False,
    num_products: int | None = None,
    catalog_seed: int = 0,
    title_nouns: str = "closed_class",
    cache_dir: str | None = None,
) -> Shop:
    """The shop for these options, built once per process and shared by every environment that
    asks for it (train and validation envs share one catalog and index). See `WebShopEnv`."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if data_dir is not None:
        catalog = load_official_catalog(data_dir, use_small=use_small, human_goals=human_goals,
                                        num_products=num_products, seed=catalog_seed)
    else:
        catalog = generated_catalog(num_products if num_products is not None else 1000, catalog_seed, cache)
    index = SearchIndex.build(catalog.products, cache if len(catalog.products) >= INDEX_CACHE_MIN_PRODUCTS else None)
    return Shop(catalog, index, title_nouns=title_nouns)


def available_actions(page: Page) -> list[str]:
    """verl-agent's `format_avail_actions`: the search placeholder when the page has a search box,
    then `click[...]` for every clickable."""
    actions = [SEARCH_PLACEHOLDER] if page.has_search_bar else []
    return actions + [f"click[{c}]" for c in page.clickables()]


def format_observation(page: Page) -> str:
    """verl-agent's `format_obs`: the parts after the instruction, each quoted and joined by
    " [SEP] "; a page without the instruction (the done page) as WebShop's plain text."""
    kinds = [e.kind for e in page.elements]
    if "instruction" not in kinds:
        return simple_text(page)
    return " [SEP] ".join(f"'{e.text}'" for e in page.elements[kinds.index("instruction") + 1 :])


@register_env("webshop")
class WebShopEnv(BatchEnv):
    """WebShop (Yao et al., 2022) as in verl-agent; see the module docstring.

    Options:
    - split: "train", "valid" or "test" (official data: goals [1500:], [500:1500], [0:500], as
      verl-agent; generated catalog: goal index % 10 >= 2, == 1, == 0). An instance with seed s gets
      goal s % len(split goals).
    - max_steps: steps before an episode is cut off (15, the paper's setting).
    - history_length: (observation, action) pairs in the prompt (2, the paper's setting).
    - data_dir: folder with WebShop's data files (see `catalog.load_official_catalog`); None (the
      default) uses the generated catalog.
    - use_small: with data_dir, the 1,000-product files (verl-agent's default) or the full ones.
    - human_goals: with data_dir, the human-written instructions instead of the synthetic goals
      (verl-agent's default is synthetic).
    - num_products: generated catalog size (default 1,000); with data_dir, keep only the first
      products of the file (default: all, as verl-agent).
    - catalog_seed: seed of the generated catalog and of WebShop's random price draws.
    - observation_mode: "text" (verl-agent's quoted [SEP] text) or "text_rich" (WebShop's rich text).
    - title_nouns: "closed_class" (default; no tagger needed) or "spacy" (the original's
      en_core_web_sm tagger, if installed) for the reward's title-noun matching (see reward.py).
    - cache_dir: where large generated catalogs and indexes are kept (default $T2PO_CACHE or
      ~/.cache/t2po).
    """

    check_admissible = True

    def __init__(
        self,
        split: str = "train",
        max_steps: int = 15,
        history_length: int = 2,
        data_dir: str | None = None,
        use_small: bool = True,
        human_goals: bool = False,
        num_products: int | None = None,
        catalog_seed: int = 0,
        observation_mode: str = "text",
        title_nouns: str = "closed_class",
        cache_dir: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise InvalidInput(f"WebShop split must be one of {', '.join(SPLITS)}, got {split!r}.")
        if observation_mode not in OBSERVATION_MODES:
            raise InvalidInput(f"observation_mode must be one of {', '.join(OBSERVATION_MODES)}, got "
                               f"{observation_mode!r}.")
        if title_nouns not in TITLE_NOUN_MODES:
            raise InvalidInput(f"title_nouns must be one of {', '.join(TITLE_NOUN_MODES)}, got {title_nouns!r}.")
        if max_steps < 1:
            raise InvalidInput(f"max_steps must be at least 1, got {max_steps}.")
        if num_products is not None and num_products < 1:
            raise InvalidInput(f"num_products must be at least 1 (or unset), got {num_products}.")
        self.split = split
        self.max_steps = max_steps
        self.history_length = history_length
        self.observation_mode = observation_mode
        data = str(Path(data_dir).expanduser()) if data_dir is not None else None
        cache = str(cache_dir) if cache_dir is not None else None
        self.shop = open_shop(data, use_small, human_goals, num_products, catalog_seed, title_nouns, cache)
        self.goals = self.shop.catalog.split_goals(split)
        self._sessions: list[ShopSession] = []
        self._steps: list[int] = []

    @property
    def catalog(self) -> Catalog:
        return self.shop.catalog

    # ---- protocol

    def reset(self, seeds: list[int]) -> list[EnvState]:
        self._sessions = [self.shop.new_session(self.goals[seed % len(self.goals)]) for seed in seeds]
        self._steps = [0] * len(seeds)
        return [self._state(i) for i in range(len(seeds))]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        if len(actions) != len(self._sessions):
            raise ValueError(f"step() got {len(actions)} actions for {len(self._sessions)} instances; pass None for "
                             "finished ones.")
        states: list[EnvState | None] = []
        for i, action in enumerate(actions):
            if action is None:
                states.append(None)
                continue
            session = self._sessions[i]
            if session.done or self._steps[i] >= self.max_steps:
                raise ValueError(f"Instance {i} has finished its episode; pass None as its action.")
            applied = self.shop.act(session, action)
            self._steps[i] += 1
            states.append(self._state(i, applied=applied))
        return states

    def task_description(self, index: int) -> str:
        return self._sessions[index].goal.instruction_text

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        actions = "\n".join(f"'{a}'," for a in state.admissible_actions or [])
        task = self.task_description(index)
        no_history = WEBSHOP_TEMPLATE_NO_HIS.format(task_description=task, current_observation=state.observation,
                                                    available_actions=actions)
        if not history or self.history_length <= 0:
            return no_history
        recent = history[-self.history_length :]
        first = len(history) - len(recent) + 1
        action_history = "".join(
            f"\n[Observation {first + j}: '{obs}', Action {first + j}: '{act}']" for j, (obs, act) in enumerate(recent)
        )
        prompt = WEBSHOP_TEMPLATE.format(
            task_description=task,
            step_count=len(history),
            history_length=len(recent),
            action_history=action_history.strip(),
            current_step=len(history) + 1,
            current_observation=state.observation,
            available_actions=actions,
        )
        return prompt if len(prompt) <= PROMPT_CHAR_LIMIT else no_history

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        """The `<think>...</think><action>...</action>` format, then admissibility: `search[q]` with
        a non-empty query other than the placeholder when the page has a search box, or one of
        the page's `click[...]` actions. Never raises."""
        if self.response_format == "reference":  # the reference's webshop_projection: its regex, no pool
            parsed = reference_think_action(response)
        else:
            parsed = parse_think_action(response, strict=self.response_format == "strict")
        if not parsed.valid:
            return parsed
        name, arg = parse_action(parsed.action)
        if name == "search" and arg is not None:
            if not state.info.get("has_search_bar"):
                return ParsedAction(parsed.action, False, "no search box on this page")
            if parsed.action == SEARCH_PLACEHOLDER:
                return ParsedAction(parsed.action, False, "search placeholder instead of a query")
            if not arg.strip():
                return ParsedAction(parsed.action, False, "empty search query")
            return parsed
        if parsed.action not in (state.admissible_actions or []):
            return ParsedAction(parsed.action, False, "action not admissible")
        return parsed

    def expert_response(self, index: int, state: EnvState) -> str | None:
        """The oracle's next step: search the goal (its instruction without the price clause; the
        target's title after a failed search), page through the results to the target, open it,
        choose the goal's options, buy."""
        session = self._sessions[index]
        if session.done:
            return None
        thought, action = self._oracle_step(session)
        return f"<think>{thought}</think><action>{action}</action>"

    # ---- internals

    def _state(self, i: int, applied: bool = True) -> EnvState:
        session = self._sessions[i]
        page = self.shop.render(session)
        observation = format_observation(page) if self.observation_mode == "text" else rich_text(page)
        info: dict[str, Any] = {
            "page": page.kind,
            "has_search_bar": page.has_search_bar,
            "action_applied": applied,
            "goal_asin": session.goal.asin,
        }
        reward, done, won, metrics = 0.0, False, False, {}
        if session.done:
            assert session.outcome is not None
            score = session.outcome.reward
            won = score == 1.0  # verl-agent: won when WebShop's reward is exactly 1
            reward, done = (SUCCESS_REWARD if won else 0.0), True
            metrics = {"success": int(won), "score": score}
            info["reward_info"] = session.outcome.as_dict()
            info["purchased"] = {"asin": session.asin, "options": dict(session.options)}
        elif self._steps[i] >= self.max_steps:
            done, metrics = True, {"success": 0, "score": 0.0}
            info["truncated"] = True
        return EnvState(
            observation=observation,
            reward=reward,
            done=done,
            won=won,
            admissible_actions=[] if done else available_actions(page),
            metrics=metrics,
            info=info,
        )

    def _wanted_options(self, goal: Goal) -> dict[str, str]:
        """Option name -> value the goal asks for on the target product (human goals give free
        text: take the product value that best matches each goal option, as the reward would)."""
        product = self.catalog.by_asin[goal.asin]
        if isinstance(goal.goal_options, dict):
            return {name: value for name, value in goal.goal_options.items() if value in product.options.get(name, [])}
        wanted: dict[str, str] = {}
        for goal_option in goal_option_list(goal):
            target = normalize_color(goal_option)
            scored = [
                (token_set_ratio(normalize_color(value), target), name, value)
                for name, values in product.options.items()
                for value in values
            ]
            best = max(scored, default=None, key=lambda t: t[0])
            if best is not None and best[0] > FUZZY_MATCH_THRESHOLD:
                wanted.setdefault(best[1], best[2])
        return wanted

    def _oracle_step(self, s: ShopSession) -> tuple[str, str]:
        goal, target = s.goal, s.goal.asin
        if s.page == "search":
            if s.searches == 0:
                query = _PRICE_CLAUSE.sub("", goal.instruction_text).replace("[", " ").replace("]", " ")
                return "I should search for the product the task describes.", f"search[{query}]"
            title = self.catalog.by_asin[target].name.lower().replace("[", " ").replace("]", " ")
            return "The first search did not show a matching product, so I search for its title.", f"search[{title}]"
        if s.page == "results":
            if target in s.page_results:
                return f"{target} matches what the task asks for, so I open it.", f"click[{target.lower()}]"
            if s.page_num * 10 < len(s.results):
                return "No matching product on this page; I look at the next one.", "click[next >]"
            return "None of the results matches; I go back and search differently.", "click[back to search]"
        if s.page == "item" and s.asin != target:
            return "This is not the product I need; I go back to the results.", "click[< prev]"
        if s.page == "item":
            clickables = self.shop.render(s).clickables()
            for name, value in self._wanted_options(goal).items():
                # a value that another option group also offers cannot be chosen for this group
                if s.options.get(name) != value and getattr(clickables.get(value), "group", None) == name:
                    return f"The task asks for {name} {value}, so I select it.", f"click[{value}]"
            return ("The product and its options match the task and the price is within budget, so I buy it.",
                    "click[buy now]")
        return "I go back to the product page.", "click[< prev]"
