"""Reading a vote's verdict from generated text, by the rules of shared/rrm_prompt.md.

1. Only the text after the LAST "</think>" counts (a verdict inside the reasoning never counts).
   Without "</think>" the vote is invalid, unless the caller says the prompt had no thinking section
   (`require_think_end=False`): then the whole text is the answer.
2. In that text take the LAST "\\boxed{" and its brace-matched content ("\\fbox{" only when there is no
   "\\boxed{" at all). If that last box never closes, the answer is unreadable: the vote is invalid
   (an earlier, complete box is NOT used, since the model was in the middle of replacing it).
3. The box content is read one of two ways (`reading=`):
   - "exact", the RRM release's reference parser (and shared/rrm_prompt.md): the content with surrounding
     whitespace stripped must be exactly "Assistant 1" or "Assistant 2"; anything else is
     "unknown_content". The box opener is the literal "\\boxed{" ("\\fbox{" as the fallback).
   - "tolerant": Unicode NFKC (full-width letters and digits fold to ASCII), one \\text{..} /
     \\textbf{..} / \\mathrm{..} / \\mathbf{..} wrapper removed, surrounding whitespace, "." and "*"
     stripped, case ignored, any run of whitespace between "Assistant" and the digit (including none),
     whitespace between "\\boxed" and "{". Nothing else: "Assistant 1 and 2", "both", "A", "1" alone are
     "unknown_content".
   Which is the default where: `parse_verdict`, the rule-based training reward (train/rollout.py),
   `rrm-engine eval` and `Judge(strict=True)` read exactly; a non-strict Judge reads tolerantly unless
   given `reading="exact"`; `read_verdict` (the low-level reader) takes it as an argument.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Literal

from .prompt import THINK_CLOSE

Reading = Literal["exact", "tolerant"]
READINGS: tuple[str, ...] = ("exact", "tolerant")
Reason = Literal["ok", "no_think_end", "no_box", "unknown_content", "truncated", "empty"]
REASONS: tuple[str, ...] = ("ok", "no_think_end", "no_box", "unknown_content", "truncated", "empty")

_BOX_RE = re.compile(r"\\boxed\s*\{")
_FBOX_RE = re.compile(r"\\fbox\s*\{")
_EXACT_BOX_RE = re.compile(r"\\boxed\{")
_EXACT_FBOX_RE = re.compile(r"\\fbox\{")
_EXACT = {"Assistant 1": 1, "Assistant 2": 2}
_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\s*\{(.*)\}$", re.DOTALL)
_VERDICT_RE = re.compile(r"^assistant\s*([12])$", re.IGNORECASE)


def _matched_content(text: str, open_end: int) -> str | None:
    """Content between the "{" ending at open_end and its matching "}", or None if it never closes."""
    depth = 1
    for i in range(open_end, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_end:i]
    return None


def last_box(text: str, reading: Reading = "tolerant") -> tuple[bool, str | None]:
    """(found, content) for the last \\boxed{...} (\\fbox fallback); content None when unclosed."""
    box, fbox = (_EXACT_BOX_RE, _EXACT_FBOX_RE) if reading == "exact" else (_BOX_RE, _FBOX_RE)
    matches = list(box.finditer(text)) or list(fbox.finditer(text))
    if not matches:
        return False, None
    return True, _matched_content(text, matches[-1].end())


def box_verdict(content: str, reading: Reading = "tolerant") -> int | None:
    """1, 2 or None for the content of a box, read `reading`'s way."""
    if reading == "exact":
        return _EXACT.get(content.strip())
    s = unicodedata.normalize("NFKC", content).strip()
    wrapped = _WRAPPER_RE.match(s)
    if wrapped:
        s = wrapped.group(1)
    s = s.strip().strip(".*").strip()
    m = _VERDICT_RE.match(s)
    return int(m.group(1)) if m else None


def read_verdict(
    text: str,
    finish_reason: str | None = None,
    *,
    require_think_end: bool = True,
    think_close: str = THINK_CLOSE,
    reading: Reading = "tolerant",
) -> tuple[int | None, Reason]:
    """(verdict 1 | 2 | None, reason). finish_reason "length" turns a missing piece into "truncated"."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    check_reading(reading)
    cut = finish_reason == "length"
    if not text.strip():
        return None, "truncated" if cut and text else "empty"
    end = text.rfind(think_close)
    if end < 0:
        if require_think_end:
            return None, "truncated" if cut else "no_think_end"
        answer = text
    else:
        answer = text[end + len(think_close):]
    found, content = last_box(answer, reading)
    if not found or content is None:
        return None, "truncated" if cut else "no_box"
    verdict = box_verdict(content, reading)
    return (verdict, "ok") if verdict is not None else (None, "unknown_content")


def check_reading(reading: object) -> Reading:
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    return reading  # type: ignore[return-value]


def parse_verdict(text: str, reading: Reading = "exact") -> int | None:
    """1 (first response better), 2 (second) or None, paper-faithful: "</think>" is required and, by
    default, the box holds exactly "Assistant 1" or "Assistant 2" (the reference parser's reading);
    reading="tolerant" accepts the wrappers, case and NFKC variants listed above."""
    return read_verdict(text, reading=reading)[0]
