"""Loud, never silent: a failed forced continuation fails its comparison (never a verdict from the
remaining votes), and a judge whose recent votes are mostly invalid raises the invalid-rate alarm
(a metric and one warning). Real engine, scripted tiny models (test_judge_semantics.make_llm), a real
fault in a decoder layer (tests/fault_injection.py)."""
from __future__ import annotations

import warnings

import pytest

from fault_injection import Fault
from rrm_engine.judge.alarm import InvalidRateAlarm
from rrm_engine.judge.voting import Vote
from test_judge_semantics import A, B, P_FORCED, Q, judge, make_llm  # noqa: F401  (make_llm: a fixture)

RAMBLE = "Let me think about which of these two answers is better overall"


def forced_request_in_step(engine) -> bool:
    """The step being run holds a forced continuation (the only requests asking for log-probs of ids)."""
    sched = engine._running_step or engine.scheduler.current
    return sched is not None and any(s.request.params.logprob_token_ids for s in sched.touched)


def test_failed_forced_continuation_fails_the_comparison(make_llm):  # noqa: F811
    llm = make_llm(RAMBLE)
    j = judge(llm, max_tokens=5)  # every vote is cut by max_tokens, so every vote is forced
    eng = llm.engine
    fault = Fault(eng, None, at=1, when=lambda: forced_request_in_step(eng))
    handle = eng.model.model.layers[1].register_forward_hook(fault.hook)
    try:
        (c,) = j.compare_batch([(Q, A, B)], errors="return")
    finally:
        handle.remove()
    assert fault.fired
    # the comparison failed with the error: no verdict, no votes, no p_first from the survivors
    assert c.error is not None and "forced continuation of vote" in c.error and "InjectedFault" in c.error
    assert (c.winner, c.votes, c.p_first, c.counts) == (None, [], None, (0, 0))
    assert any("InjectedFault" in e for e in j.errors)
    # compare() raises it; on an engine of its own, so that nothing the first comparison left in
    # flight (its other votes' continuations, aborted when it failed) can be the request that fails
    llm = make_llm(RAMBLE)
    j, eng = judge(llm, max_tokens=5), llm.engine
    fault = Fault(eng, None, at=1, when=lambda: forced_request_in_step(eng))
    handle = eng.model.model.layers[1].register_forward_hook(fault.hook)
    with pytest.raises(RuntimeError, match="forced continuation"):
        try:
            j.compare(Q, A, B)
        finally:
            handle.remove()
    assert fault.fired
    # the fault is gone: the same comparison answers from all three forced votes
    ok = j.compare(Q, A, B)
    assert ok.error is None and (ok.forced, ok.invalid, ok.winner) == (3, 0, 1)
    assert ok.p_first == pytest.approx(P_FORCED, abs=1e-3)


# ------------------------------------------------------------------------------------ the alarm
def votes(*verdicts):
    return [Vote(v, "ok" if v else "no_box", "", 1, None) for v in verdicts]


def test_alarm_raises_warns_once_and_lowers():
    alarm = InvalidRateAlarm(window=4, threshold=0.5)
    assert not alarm.record(votes(1, None, None))  # not full
    with pytest.warns(RuntimeWarning, match="3 of the last 4 votes were invalid"):
        assert alarm.record(votes(None))
    m = alarm.metrics()
    assert (m["invalid_alarm"], m["invalid_alarm_trips"], m["window_invalid_rate"]) == (True, 1, 0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, even when it trips again
        assert alarm.record(votes(None))  # 1 of the oldest (valid) drops out: 4 of 4 invalid
        assert not alarm.record(votes(1, 2, 1))  # 1 invalid of 4: lowered
        assert alarm.metrics()["invalid_alarm"] is False
        assert alarm.record(votes(None, None, None))  # raised again: counted, not warned
    m = alarm.metrics()
    assert (m["invalid_alarm_trips"], m["votes"], m["invalid"]) == (2, 11, 7)
    # exactly half is not "mostly invalid"
    half = InvalidRateAlarm(window=4, threshold=0.5)
    assert not half.record(votes(None, None, 1, 2))
    with pytest.raises(ValueError, match="window"):
        InvalidRateAlarm(window=0)
    with pytest.raises(ValueError, match="threshold"):
        InvalidRateAlarm(threshold=1.0)


def test_judge_raises_the_alarm_on_a_run_of_invalid_votes(make_llm):  # noqa: F811
    bad = judge(make_llm("Both are fine."))
    bad.invalid_alarm = InvalidRateAlarm(window=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = bad.compare(Q, A, B)  # 3 invalid votes: the window of 6 is not full yet
    assert c.invalid == 3 and not bad.invalid_alarm.metrics()["invalid_alarm"]
    with pytest.warns(RuntimeWarning, match="6 of the last 6 votes were invalid"):
        bad.compare(Q, A, B)
    m = bad.invalid_alarm.metrics()
    assert (m["invalid_alarm"], m["window_invalid_rate"], m["votes"], m["invalid"]) == (True, 1.0, 6, 6)
    # a judge that reads its verdicts never raises it
    good = judge(make_llm("\\boxed{Assistant2}"))
    good.invalid_alarm = InvalidRateAlarm(window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good.compare(Q, A, B)
        good.compare(Q, A, B)
    assert good.invalid_alarm.metrics()["invalid_alarm"] is False
