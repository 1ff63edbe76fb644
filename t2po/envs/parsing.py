"""Turning model responses into environment actions (the reference's "projection" functions).

A response has the form `<think> ... </think><action> ... </action>` (docs/method.md §2). How strictly that is
checked is the environment option `response_format` (`RESPONSE_FORMATS`):
- "reference" (the default): each environment's own projection in the authors' code
  (WillDreamer/T2PO-ICML, agent_system/environments/env_package/*/projection.py). ALFWorld and WebShop
  (and any environment without a projection of its own): `reference_think_action`, the case-insensitive
  whole-response regex `^\s*<think>(.*?)</think>\s*<action>(.*?)</action>\s*$` with one of each tag, no
  Chinese characters, and, where checked, the lowercased action in the lowercased admissible list.
  Sokoban (`t2po.envs.sokoban.env.sokoban_projection`) and the card games
  (`t2po.envs.cards.game.cards_projection`) are lenient: a direction / one action keyword as a substring.
  Search QA always uses its projection (`t2po.envs.search.env.parse_search_action`).
- "strict": one think span followed by one action span, whitespace allowed around and between them;
  text after `</action>`, text between `</think>` and `<action>`, text before `<think>` and a repeated tag
  (e.g. a second `</think>` written after TTI forced one) make the action invalid; tags are case-sensitive.
- "lenient": a think span that closes before the first action span is enough; other text is ignored.
An invalid response still yields an action string for the environment (the extracted action, or the last
30 characters of the response, as the reference does); the caller penalises it. Nothing here raises on
malformed text, and every check runs in time linear in the response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CJK = re.compile(r"[\u4e00-\u9fff]")
_TAGS = ("<think>", "</think>", "<action>", "</action>")
_STRICT_FORM = re.compile(r"\s*<think>.*?</think>\s*<action>.*?</action>\s*", re.DOTALL)

#: response format checks (the environment option `response_format`); the first is the default
RESPONSE_FORMATS = ("reference", "strict", "lenient")

# the reference's ALFWorld / WebShop projection (quoted in the module docstring)
_REFERENCE_FORM = re.compile(r"\s*<think>(.*?)</think>\s*<action>(.*?)</action>\s*", re.IGNORECASE | re.DOTALL)
_OPEN_TAG = {tag: re.compile(rf"<\s*{tag}\s*>", re.IGNORECASE) for tag in ("think", "action")}
_CLOSE_TAG = {tag: re.compile(rf"</\s*{tag}\s*>", re.IGNORECASE) for tag in ("think", "action")}


@dataclass(frozen=True)
class ParsedAction:
    action: str  # what the environment receives
    valid: bool  # False = invalid action (penalised by `invalid_action_penalty`)
    reason: str = ""  # why it is invalid, for traces ("" when valid)


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the first `<tag>...</tag>` span, stripped; None when either tag is missing."""
    start = text.find(f"<{tag}>")
    if start == -1:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start)
    if end == -1:
        return None
    return text[start:end].strip()


def check_response_format(response_format: str) -> str:
    """`response_format` if it is one of `RESPONSE_FORMATS`, else a ValueError naming the choices."""
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
    return response_format


def _strict_form_violation(text: str) -> str:
    """Why `text` is not exactly `<think>...</think><action>...</action>` ("" when it is)."""
    for tag in _TAGS:
        if text.count(tag) > 1:
            return f"repeated {tag} tag"
    if _STRICT_FORM.fullmatch(text):
        return ""
    if text[text.find("</action>") + len("</action>"):].strip():
        return "text after </action>"
    if text[: text.find("<think>")].strip():
        return "text before <think>"
    return "text between </think> and <action>"


def parse_think_action(response: str, admissible: list[str] | None = None, lowercase: bool = True,
                       strict: bool = True) -> ParsedAction:
    """The `<think>...</think><action>...</action>` check (docs/method.md §4 "invalid action"); `strict` is the
    reference's whole-response form, `strict=False` the lenient mode (module docstring)."""
    text = response if isinstance(response, str) else ""
    action = extract_tag(text, "action")
    if action is None:
        fallback = text[-30:]
        return ParsedAction(fallback.lower() if lowercase else fallback, False, "no <action>...</action> span")
    if lowercase:
        action = action.lower()
    think_start, think_end = text.find("<think>"), text.find("</think>")
    if think_start == -1 or think_end == -1 or think_end < think_start:
        return ParsedAction(action, False, "no <think>...</think> span")
    if think_end > text.find("<action>"):
        return ParsedAction(action, False, "<action> before </think>")
    if strict and (violation := _strict_form_violation(text)):
        return ParsedAction(action, False, violation)
    if _CJK.search(text):
        return ParsedAction(action, False, "contains CJK characters")
    if not action:
        return ParsedAction(action, False, "empty action")
    if admissible is not None:
        lookup = {a.lower(): a for a in admissible} if lowercase else {a: a for a in admissible}
        if action not in lookup:
            return ParsedAction(action, False, "action not admissible")
        action = lookup[action]
    return ParsedAction(action, True)


def reference_think_action(response: str, admissible: list[str] | None = None) -> ParsedAction:
    """The reference's ALFWorld / WebShop projection (`alfworld_projection`, `webshop_projection`):

        strict_pattern = re.compile(r'^\s*<think>(.*?)</think>\s*<action>(.*?)</action>\s*$', flags=re.IGNORECASE |
        re.DOTALL)
        strict_ok = bool(m) and not has_chinese and (
            think_open_count == think_close_count == 1 and action_open_count == action_close_count == 1)

    then the lowercased action must be in the lowercased pool (`admissible`, ALFWorld). A response that fails
    gives the first `<action>...</action>` span's content (lowercased), else its last 30 characters, as an
    invalid action. The tags are counted first, so the regex only ever runs on one of each (linear time)."""
    text = response if isinstance(response, str) else ""
    counts = [len(pattern.findall(text)) for tags in (_OPEN_TAG, _CLOSE_TAG) for pattern in tags.values()]
    match = _REFERENCE_FORM.fullmatch(text) if counts == [1, 1, 1, 1] else None
    if match is None or _CJK.search(text):
        opening = _OPEN_TAG["action"].search(text)
        closing = _CLOSE_TAG["action"].search(text, opening.end()) if opening else None
        if closing is None:
            return ParsedAction(text[-30:], False, "no <action>...</action> span")
        reason = ("contains CJK characters" if match is not None
                  else "not exactly <think>...</think><action>...</action>")
        return ParsedAction(text[opening.end() : closing.start()].strip().lower(), False, reason)
    action = match.group(2).strip().lower()
    if admissible is not None:
        lookup = {a.lower(): a for a in admissible}
        if action not in lookup:
            return ParsedAction(action, False, "action not admissible")
        action = lookup[action]
    return ParsedAction(action, True)
