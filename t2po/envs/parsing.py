"""Turning model responses into environment actions (the reference's "projection" functions).

A response is valid when it has the form `<think> ... </think> ... <action> ... </action>` (think span
first, then an action span), contains no CJK characters (the reference rejects them), and, where the
environment checks it, the action is admissible. An invalid response still yields an action string
for the environment (the extracted action, or the last 30 characters of the response, as the
reference does); the caller penalises it. Nothing here raises on malformed text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CJK = re.compile(r"[\u4e00-\u9fff]")


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


def parse_think_action(response: str, admissible: list[str] | None = None, lowercase: bool = True) -> ParsedAction:
    """Strict `<think>...</think><action>...</action>` check (spec §4 "invalid action")."""
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
