"""Turning model responses into environment actions (the reference's "projection" functions).

A response is valid when it has the form `<think> ... </think><action> ... </action>` (docs/method.md §2),
contains no CJK characters (the reference rejects them), and, where the environment checks it, the
action is admissible. The format check has two modes (`RESPONSE_FORMATS`, the environment option
`response_format`):
- "strict" (the default, the reference's check): the whole response is one think span followed by one
  action span, whitespace allowed around and between them; text after `</action>`, text between
  `</think>` and `<action>`, text before `<think>` and a repeated tag (e.g. a second `</think>` written
  after TTI forced one) make the action invalid;
- "lenient": a think span that closes before the first action span is enough; other text is ignored. An invalid response still yields an action string
for the environment (the extracted action, or the last 30 characters of the response, as the
reference does); the caller penalises it. Nothing here raises on malformed text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CJK = re.compile(r"[\u4e00-\u9fff]")
_TAGS = ("<think>", "</think>", "<action>", "</action>")
_STRICT_FORM = re.compile(r"\s*<think>.*?</think>\s*<action>.*?</action>\s*", re.DOTALL)

#: response format checks (the environment option `response_format`); the first is the default
RESPONSE_FORMATS = ("strict", "lenient")


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


def parse_think_action(response: str, admissible: list[str] | None = None, lowercase: bool = True, strict: bool = True) -> ParsedAction:
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
