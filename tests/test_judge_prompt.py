"""The RRM prompt, byte for byte against the published format (shared/rrm_prompt.md)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rrm_engine.judge.prompt import SYSTEM, USER, PromptBuilder, fill_template

# DeepSeek-R1-Distill-Qwen's rendering of a system + user turn with add_generation_prompt
R1_TEMPLATE = (
    "<｜begin▁of▁sentence｜>{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
PUBLISHED_USER = (
    "## Query\n\n{question}\n\n## Assistant responses\n\n### Assistant 1\n\n{answer1}\n\n\n### Assistant 2\n\n{answer2}\n\n"
    + "## Analysis\n\nLet's analyze this step by step and decide which assistant is better, and then answer \\boxed{Assistant 1} or \\boxed{Assistant 2}."
)
SYSTEM_SHA256 = "84b052628bac5f29f880e49277ea0b8b449fc4fadcc1ac3cb1a62e858f98529a"
SPEC = Path(__file__).resolve().parents[2] / "shared" / "rrm_prompt.md"


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):  # conftest: the embedded model's tokenizer, or a skip
    return smollm2_tokenizer


def test_strings_match_published():
    assert USER == PUBLISHED_USER
    assert hashlib.sha256(SYSTEM.encode()).hexdigest() == SYSTEM_SHA256
    assert SYSTEM.endswith("Omit any other output.\n\n")
    if SPEC.exists():  # the published block itself, when the shared docs are present
        block = SPEC.read_text().split("## SYSTEM", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
        assert block == SYSTEM


def test_r1_rendering_byte_for_byte(tokenizer):
    b = PromptBuilder(tokenizer, chat_template=R1_TEMPLATE)
    q, a1, a2 = "What is 2+2?", "4", "five {answer1} \\1 {}"
    p = b.build(q, a1, a2)
    user = PUBLISHED_USER.replace("{question}", q).replace("{answer1}", a1)
    user = user.replace("{answer2}", a2)  # safe here: a2 is substituted last
    assert p.text == "<｜begin▁of▁sentence｜>" + SYSTEM + "<｜User｜>" + user + "<｜Assistant｜><think>\n"
    assert p.opens_think
    assert p.token_ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]


def test_literal_substitution_is_single_pass():
    out = fill_template(USER, "q {answer2} {question}", "a \\g<0> {", "}b{answer1}")
    assert "## Query\n\nq {answer2} {question}\n\n" in out
    assert "### Assistant 1\n\na \\g<0> {\n\n\n" in out
    assert "### Assistant 2\n\n}b{answer1}\n\n## Analysis" in out


def test_embedded_template_does_not_open_think(tokenizer):
    b = PromptBuilder(tokenizer)
    p = b.build("q", "a", "b")
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": fill_template(USER, "q", "a", "b")}]
    assert p.text == tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert not p.opens_think and "<think>" not in p.text
    assert p.token_ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]


def test_custom_user_template(tokenizer):
    b = PromptBuilder(tokenizer, user_template="Q={question}|1={answer1}|2={answer2}", system=None)
    assert "Q=x|1=y|2=z" in b.build("x", "y", "z").text
    with pytest.raises(ValueError, match="answer2"):
        PromptBuilder(tokenizer, user_template="{question} {answer1}")


def test_bad_input(tokenizer):
    b = PromptBuilder(tokenizer)
    with pytest.raises(ValueError, match="multi-turn"):
        b.build([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "a", "b")
    with pytest.raises(ValueError, match="query is empty"):
        b.build("  ", "a", "b")
    with pytest.raises(ValueError, match="response b must be a str"):
        b.build("q", "a", 3)
