"""Verdict parsing on nasty outputs."""
from __future__ import annotations

import pytest

from rrm_engine.judge.verdict import parse_verdict, read_verdict


@pytest.mark.parametrize(
    "text, finish, expected",
    [
        ("think...\n</think>\n\n\\boxed{Assistant 1}", "stop", (1, "ok")),
        ("x</think>\\boxed{Assistant 2}", None, (2, "ok")),
        # verdict in the thinking, a different one after </think>: only the latter counts
        ("I'd say \\boxed{Assistant 1}.\n</think>\n\\boxed{Assistant 2}", "stop", (2, "ok")),
        # several </think>: the text after the last one
        ("a</think>\\boxed{Assistant 1}</think>\\boxed{Assistant 2}", "stop", (2, "ok")),
        # several boxes after </think>: the last one
        ("</think>\\boxed{Assistant 2} no wait \\boxed{Assistant 1}", "stop", (1, "ok")),
        # nested braces are matched, the wrapper removed
        ("</think>\\boxed{\\text{Assistant 2}}", "stop", (2, "ok")),
        ("</think>\\boxed{\\textbf{ assistant  1 }}.", "stop", (1, "ok")),
        ("</think>\\boxed{Assistant {1}}", "stop", (None, "unknown_content")),
        ("</think>\\boxed{Assistant 1 and Assistant 2}", "stop", (None, "unknown_content")),
        ("</think>\\boxed{}", "stop", (None, "unknown_content")),
        ("</think>\\boxed{1}", "stop", (None, "unknown_content")),
        ("</think>\\boxed { Assistant2 }", "stop", (2, "ok")),
        # \fbox only as a fallback
        ("</think>\\fbox{Assistant 1}", "stop", (1, "ok")),
        ("</think>\\fbox{Assistant 1} \\boxed{Assistant 2}", "stop", (2, "ok")),
        # missing </think>
        ("\\boxed{Assistant 1}", "stop", (None, "no_think_end")),
        ("long thinking \\boxed{Assistant 1} and more", "length", (None, "truncated")),
        # empty
        ("", "stop", (None, "empty")),
        ("  \n ", "stop", (None, "empty")),
        # no box after </think>
        ("</think> Assistant 1 is better", "stop", (None, "no_box")),
        # cut inside the box: the last box never closes, an earlier one is not used
        ("</think>\\boxed{Assistant 1} hmm \\boxed{Assis", "length", (None, "truncated")),
        ("</think>\\boxed{Assistant 1", "stop", (None, "no_box")),
        # unicode: full-width text folds, other scripts do not crash
        ("思考…</think>\\boxed{Ａｓｓｉｓｔａｎｔ　２}", "stop", (2, "ok")),
        ("🙂</think>\\boxed{助手 1}", "stop", (None, "unknown_content")),
    ],
)
def test_read_verdict(text, finish, expected):
    assert read_verdict(text, finish) == expected


def test_no_think_section_mode():
    assert read_verdict("\\boxed{Assistant 2}", "stop", require_think_end=False) == (2, "ok")
    # a </think> still splits when present
    assert read_verdict("\\boxed{Assistant 2}</think>\\boxed{Assistant 1}", require_think_end=False) == (1, "ok")
    assert read_verdict("meh", "length", require_think_end=False) == (None, "truncated")


def test_parse_verdict_is_strict():
    assert parse_verdict("t</think>\\boxed{Assistant 1}") == 1
    assert parse_verdict("\\boxed{Assistant 1}") is None
    with pytest.raises(ValueError):
        read_verdict(None)  # type: ignore[arg-type]


# the reference parser of the RRM release: the stripped box content is "Assistant 1" / "Assistant 2" exactly
@pytest.mark.parametrize("box, exact, tolerant", [
    ("Assistant 1", 1, 1),
    ("Assistant 2", 2, 2),
    ("  Assistant 2\n", 2, 2),  # surrounding whitespace is stripped by both
    ("\\text{Assistant 1}", None, 1),
    ("\\textbf{Assistant 2}", None, 2),
    ("assistant 1", None, 1),
    ("ASSISTANT 2", None, 2),
    ("Assistant1", None, 1),
    ("Assistant  1", None, 1),
    ("Assistant 1.", None, 1),
    ("**Assistant 2**", None, 2),
    ("Ａｓｓｉｓｔａｎｔ　２", None, 2),  # NFKC folds full-width text
    ("Assistant 1 and Assistant 2", None, None),
    ("1", None, None),
])
def test_exact_and_tolerant_readings(box, exact, tolerant):
    text = "thinking</think>\n\n\\boxed{" + box + "}"
    assert read_verdict(text, "stop", reading="exact") == ((exact, "ok") if exact else (None, "unknown_content"))
    assert read_verdict(text, "stop", reading="tolerant") == ((tolerant, "ok") if tolerant else (None, "unknown_content"))
    assert parse_verdict(text) == exact  # the public parser reads exactly by default
    assert parse_verdict(text, reading="tolerant") == tolerant


def test_exact_reading_takes_the_literal_box_opener():
    assert read_verdict("</think>\\boxed {Assistant 1}", "stop", reading="exact") == (None, "no_box")
    assert read_verdict("</think>\\boxed {Assistant 1}", "stop", reading="tolerant") == (1, "ok")
    assert read_verdict("</think>\\fbox{Assistant 2}", "stop", reading="exact") == (2, "ok")  # the spec's fallback
    with pytest.raises(ValueError, match="reading must be one of"):
        read_verdict("</think>\\boxed{Assistant 1}", reading="lenient")  # type: ignore[arg-type]


def test_training_reward_reads_exactly():
    from rrm_engine.train.rollout import rrm_verdict

    assert rrm_verdict("t</think>\\boxed{Assistant 1}", "stop", True) == 1
    assert rrm_verdict("t</think>\\boxed{\\text{Assistant 1}}", "stop", True) is None
    assert rrm_verdict("\\boxed{assistant 2}", "stop", False) is None


def test_eval_command_reads_exactly_by_default():
    from rrm_engine.cli.main import build_parser

    p = build_parser()
    assert p.parse_args(["eval", "--pandalm", __file__]).reading == "exact"
    assert p.parse_args(["eval", "--pandalm", __file__, "--reading", "tolerant"]).reading == "tolerant"
    assert p.parse_args(["judge", "--pairs", __file__, "--out", "x.jsonl"]).reading is None  # the Judge's default


from hypothesis import given, settings, strategies as st  # noqa: E402

from rrm_engine.judge.prompt import USER, fill_template  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(st.text(), st.sampled_from([1, 2]), st.text(alphabet=st.characters(blacklist_characters="\\{}")))
def test_reasoning_never_counts(thinking, verdict, tail):
    # whatever the thinking says (boxes, braces, "</think>" inside it), only the last answer counts
    text = thinking + "</think>\n\\boxed{Assistant " + str(verdict) + "}" + tail.replace("</think>", "")
    assert read_verdict(text, "stop") == (verdict, "ok")


@settings(max_examples=100, deadline=None)
@given(st.text(), st.text(), st.text())
def test_substitution_is_literal(q, a, b):
    expected = ("## Query\n\n" + q + "\n\n## Assistant responses\n\n### Assistant 1\n\n" + a + "\n\n\n### Assistant 2\n\n"
                + b + "\n\n" + USER.split("{answer2}\n\n", 1)[1])
    assert fill_template(USER, q, a, b) == expected
