"""Which votes count, which are forced, which stay invalid: the judge on real generations of scripted
tiny models (tests/scripted_model.py: weights that make the engine write a chosen text).

Rules (rrm_engine/judge/voting.py): a verdict read from the text is valid; a vote that ran out of
tokens is forced (verdict from P("1") vs P("2")); an explicit non-answer (\\boxed{both}, \\boxed{}, no box
after </think>, no </think>) stays invalid unless force="invalid"; strict forces nothing. Invalid votes
never count for either side."""
from __future__ import annotations

import math

import pytest
import torch

import rrm_engine as rrm
from rrm_engine.judge.judge import Judge
from rrm_engine.judge.prompt import PromptBuilder
from scripted_model import HIDDEN, write_scripted_qwen2
from test_judge_prompt import R1_TEMPLATE

Q, A, B = "Which is right?", "Paris.", "Berlin."
SPACE = " "  # the last token of the forced text "...\\boxed{Assistant ": its successors script the forced verdict
W1, W2 = 10.0, 10.3  # forced P("1") = sigmoid(sqrt(HIDDEN) * (W1 - W2))
P_FORCED = 1.0 / (1.0 + math.exp(-HIDDEN ** 0.5 * (W1 - W2)))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def make_llm(smollm2_tokenizer, tmp_path_factory):
    """make_llm(answer_text, template=None, branches=None) -> LLM whose votes write answer_text then EOS
    (branches: several answers, each first token equally likely, for mixed votes)."""
    tok = smollm2_tokenizer
    (space,) = ids(tok, SPACE)
    one, two = ids(tok, "1"), ids(tok, "2")
    soft = {space: {one[0]: W1, two[0]: W2}}

    def make(answer: str | None = None, template: str | None = None, branches: list[str] | None = None) -> rrm.LLM:
        last = PromptBuilder(tok, chat_template=template).build(Q, A, B).token_ids[-1]
        texts = branches or [answer]
        chains = [[*ids(tok, t), 2] for t in texts]
        if branches:
            soft_start = {last: {c[0]: 10.0 for c in chains}}
        else:
            chains[0].insert(0, last)
            soft_start = {}
        path = tmp_path_factory.mktemp("scripted")
        write_scripted_qwen2(path, tok, chains, soft={**soft, **soft_start})
        return rrm.LLM(str(path), device="cpu", dtype=torch.float32, kv_cache_tokens=4096)

    return make


def judge(llm, **kw) -> Judge:
    return Judge(llm, **{"votes": 3, "max_tokens": 24, "temperature": 0.6, "swap": "none", "seed": 0, **kw})


def assert_consistent(c) -> None:
    assert c.valid + c.forced + c.invalid == len(c.votes)
    assert c.valid == sum(v.verdict is not None and not v.forced for v in c.votes)
    assert c.forced == sum(v.verdict is not None and v.forced for v in c.votes)
    assert c.counts == (sum(v.verdict == 1 for v in c.votes), sum(v.verdict == 2 for v in c.votes))


def test_read_verdict_is_valid(make_llm):
    c = judge(make_llm("\\boxed{Assistant2}")).compare(Q, A, B)
    assert_consistent(c)
    assert [v.text for v in c.votes] == ["\\boxed{Assistant2}"] * 3
    assert (c.valid, c.forced, c.invalid, c.winner, c.counts, c.p_first) == (3, 0, 0, 1, (0, 3), 0.0)


@pytest.mark.parametrize("answer, reason", [("\\boxed{both}", "unknown_content"), ("\\boxed{}", "unknown_content"),
                                            ("Both are fine.", "no_box")])
def test_explicit_non_answer_stays_invalid(make_llm, answer, reason):
    llm = make_llm(answer)
    c = judge(llm).compare(Q, A, B)
    assert_consistent(c)
    assert [v.text for v in c.votes] == [answer] * 3 and all(v.token_ids[-1] == 2 for v in c.votes)  # ended by EOS
    assert (c.winner, c.counts, c.p_first, c.valid, c.forced, c.invalid) == (None, (0, 0), None, 0, 0, 3)
    assert c.invalid_reasons == {reason: 3} and not any(v.forced for v in c.votes)
    # opted in: the same non-answers get a verdict from the log-probs, reported as forced
    f = judge(llm, force="invalid").compare(Q, A, B)
    assert_consistent(f)
    assert (f.valid, f.forced, f.invalid, f.winner) == (0, 3, 0, 1)
    assert all(v.forced and v.reason == reason and v.p_first == pytest.approx(P_FORCED, abs=1e-3) for v in f.votes)


@pytest.mark.parametrize("answer, reason", [("Hmm</think>First one wins", "no_box"), ("Hmm, hard to say", "no_think_end")])
def test_thinking_template_non_answers_stay_invalid(make_llm, answer, reason):
    c = judge(make_llm(answer, template=R1_TEMPLATE), chat_template=R1_TEMPLATE).compare(Q, A, B)
    assert_consistent(c)
    assert (c.winner, c.valid, c.forced, c.invalid, c.invalid_reasons) == (None, 0, 0, 3, {reason: 3})


@pytest.mark.parametrize("template", [None, R1_TEMPLATE], ids=["chatml", "r1-think"])
def test_truncated_votes_are_forced(make_llm, template):
    llm = make_llm("Let me think about which of these two answers is better overall", template=template)
    c = judge(llm, max_tokens=5, chat_template=template).compare(Q, A, B)
    assert_consistent(c)
    # the forced text closes the thinking section only where one is open
    assert all(v.tokens == 5 + len(c_ids) + 1 for v in c.votes
               for c_ids in [judge(llm).forced_ids(template is not None)[0]])
    assert (c.valid, c.forced, c.invalid, c.winner) == (0, 3, 0, 1)
    assert all(v.reason == "truncated" and len(v.token_ids) == 5 for v in c.votes)
    assert c.p_first == pytest.approx(P_FORCED, abs=1e-3)
    # the same truncation with strict=True (or force="never") stays invalid
    for s in (judge(llm, max_tokens=5, strict=True, chat_template=template),
              judge(llm, max_tokens=5, force="never", chat_template=template)):
        n = s.compare(Q, A, B)
        assert (n.valid, n.forced, n.invalid, n.winner, n.p_first) == (0, 0, 3, None, None)


def test_mixed_votes_count_apart_and_invalid_never_wins(make_llm):
    """12 sampled votes over three scripted answers: a valid verdict for a, a non-answer, and a
    truncated ramble whose forced verdict favours b. The winner comes from valid + forced only."""
    llm = make_llm(branches=["\\boxed{Assistant1}", "Both are fine.",
                             "Let me think about which of these two answers is better overall"])
    c = judge(llm, votes=12, max_tokens=12, temperature=1.0, seed=5).compare(Q, A, B)
    assert_consistent(c)
    kinds = [v.text.split()[0] if v.text else "" for v in c.votes]
    n_valid, n_invalid, n_forced = kinds.count("\\boxed{Assistant1}"), kinds.count("Both"), kinds.count("Let")
    assert n_valid + n_invalid + n_forced == 12 and min(n_valid, n_invalid, n_forced) >= 1  # all three sampled
    assert (c.valid, c.invalid, c.forced) == (n_valid, n_invalid, n_forced)
    assert c.counts == (n_valid, n_forced) and c.invalid_reasons == {"no_box": n_invalid}
    expected = 0 if n_valid > n_forced else 1 if n_forced > n_valid else (0 if c.p_first > 0.5 else 1)
    assert c.winner == expected
    # the non-answers, opted in, join the forced side (P("1") < 0.5 means they vote for b)
    f = judge(llm, votes=12, max_tokens=12, temperature=1.0, seed=5, force="invalid").compare(Q, A, B)
    assert (f.valid, f.forced, f.invalid, f.counts) == (n_valid, n_forced + n_invalid, 0, (n_valid, n_forced + n_invalid))


def test_force_policy_is_checked(make_llm):
    llm = make_llm("\\boxed{Assistant2}")
    with pytest.raises(ValueError, match="force must be one of"):
        judge(llm, force="sometimes")
    with pytest.raises(ValueError, match="strict=True forces nothing"):
        judge(llm, strict=True, force="invalid")


def test_reading_exact_or_tolerant(make_llm):
    """A wrapped box: the default (tolerant) judge reads it, the exact reading (the reference parser's;
    the default with strict=True) scores it invalid, never as a vote for either side."""
    llm = make_llm("\\boxed{\\text{Assistant2}}")  # no space: " " is the forced text's scripted token
    t = judge(llm).compare(Q, A, B)
    assert (t.valid, t.invalid, t.winner) == (3, 0, 1)
    e = judge(llm, reading="exact").compare(Q, A, B)
    assert_consistent(e)
    assert (e.valid, e.forced, e.invalid, e.winner, e.invalid_reasons) == (0, 0, 3, None, {"unknown_content": 3})
    assert judge(llm, strict=True).reading == "exact"
    assert judge(llm, strict=True, reading="tolerant").reading == "tolerant"
    with pytest.raises(ValueError, match="reading must be one of"):
        judge(llm, reading="loose")
