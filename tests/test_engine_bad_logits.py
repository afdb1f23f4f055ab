"""NaN / inf logits fail the one request they belong to (issue 13, R4): the sampler flags the row
with the step's single host sync, the engine finishes that request with finish_reason "error" and
an error naming it, and every other request of the batch gets exactly what it gets alone.

The fault is real, not mocked: one token's embedding row is set to NaN, so a request that holds
(or generates) that token computes NaN hidden states, NaN KV and NaN logits through the real decoder."""
from __future__ import annotations

import os
import random

import pytest
import torch

from rrm_engine import LLM, SamplingParams
from rrm_engine.model.loader import LoadedModel

from tiny_engine_model import small_model

VOCAB = 512


def tiny() -> LoadedModel:
    return small_model(vocab=VOCAB, max_pos=256, seed=3, bias_std=None)


def ids(seed: int, n: int, avoid: int = -1) -> list[int]:
    r = random.Random(seed)
    out = []
    while len(out) < n:
        t = r.randrange(3, VOCAB)
        if t != avoid:
            out.append(t)
    return out


def run(prompts: list[list[int]], params: list[SamplingParams], poisoned: int | None = None,
        sampler_backend: str = "auto"):
    m = tiny()
    if poisoned is not None:
        with torch.no_grad():
            m.model.model.embed_tokens.weight[poisoned] = float("nan")
    llm = LLM(m, kv_cache_tokens=1024, block_size=4, sampler_backend=sampler_backend)
    outs = llm.generate(prompts, params)
    llm.engine.check()  # no leaked or doubly freed blocks after the failure
    return llm, outs


@pytest.mark.parametrize("sampler_backend", ["auto", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton sampler on CPU tensors needs the interpreter (tests/gpu runs it on a GPU)"))])
def test_nan_prompt_fails_only_its_request(sampler_backend):
    bad_token = 77
    good = [ids(1, 13, bad_token), ids(2, 22, bad_token)]
    bad = ids(3, 9, bad_token) + [bad_token] + ids(4, 6, bad_token)
    params = [SamplingParams(n=3, temperature=0.8, max_tokens=6, seed=s, ignore_eos=True) for s in (10, 11, 12)]
    _, alone = run(good, params[1:], sampler_backend=sampler_backend)
    llm, outs = run([bad] + good, params, poisoned=bad_token, sampler_backend=sampler_backend)
    failed = outs[0]
    assert failed.finished and failed.error is not None and failed.request_id in failed.error
    assert "NaN" in failed.error
    assert [c.finish_reason for c in failed.outputs] == ["error"] * 3  # the fork never happened
    assert all(c.token_ids == [] for c in failed.outputs)
    for got, want in zip(outs[1:], alone):
        assert got.error is None
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        assert [c.finish_reason for c in got.outputs] == ["length"] * 3
    assert llm.metrics()["failed_requests"] == 1


def test_nan_during_decode_fails_the_forked_request_and_the_rest_continue():
    # a clean greedy run tells which token request 0 generates second; poisoning that token's
    # embedding makes its logits NaN on the step after (a decode step, after the fork of 2 votes)
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    prompts = [ids(20, 11), ids(21, 17), ids(22, 9)]
    _, clean = run(prompts, [greedy, sampled, sampled])
    gen0 = clean[0].outputs[0].token_ids
    others = {t for o in clean[1:] for c in o.outputs for t in c.token_ids} | {t for p in prompts for t in p}
    step = next(i for i in range(1, len(gen0)) if gen0[i] not in others and gen0[i] not in gen0[:i])
    llm, outs = run(prompts, [greedy, sampled, sampled], poisoned=gen0[step])
    failed = outs[0]
    assert failed.error is not None and f"generated token {step + 1}" in failed.error
    for c in failed.outputs:  # both votes stop where the NaN appeared, keeping what came before
        assert c.finish_reason == "error" and c.token_ids == gen0[:step + 1]
    for got, want in zip(outs[1:], clean[1:]):
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert llm.metrics()["failed_requests"] == 1


def test_async_waiter_of_a_nan_request_gets_request_failed_error():
    """Through AsyncLLM (serving): the NaN request's future raises RequestFailedError naming it,
    with its final output; the other request's future gives its normal output."""
    from rrm_engine import AsyncLLM
    from rrm_engine.serving import RequestFailedError
    bad_token = 77
    m = tiny()
    with torch.no_grad():
        m.model.model.embed_tokens.weight[bad_token] = float("nan")
    alm = AsyncLLM(LLM(m, kv_cache_tokens=1024, block_size=4))
    try:
        params = SamplingParams(n=2, temperature=0.0, max_tokens=4, ignore_eos=True)
        bad = alm.submit(ids(5, 7, bad_token) + [bad_token], params, request_id="judge-7")
        good = alm.submit(ids(6, 12, bad_token), params)
        with pytest.raises(RequestFailedError, match="judge-7.*NaN") as err:
            bad.result(timeout=60)
        assert err.value.output.error is not None and err.value.output.outputs[0].finish_reason == "error"
        out = good.result(timeout=60)
        assert out.error is None and len(out.outputs[0].token_ids) == 4
    finally:
        alm.shutdown()


# ---------------------------------------------------------------- one request's sampling values
# SamplingParams refuses these when built (tests/test_sampling_params.py); a request whose params
# were changed after it was added reaches the sampler with them. It must fail alone, as a NaN row
# does (issue 22, item 1: temperature=1e999 used to fail every request of its step with HTTP 500).
BAD_VALUES = [("temperature", float("inf")), ("temperature", float("nan")), ("temperature", -1.0),
              ("top_p", float("nan")), ("top_k", 1 << 40), ("min_p", 2.0), ("logprobs", VOCAB + 1),
              ("logprob_token_ids", [VOCAB + 3]), ("temperature", "hot")]


def drive(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], mutate=None, after_steps: int = 0):
    """add every request, step to the end (calling mutate() after `after_steps` steps); outputs by id."""
    rids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs, steps = {}, 0
    while llm.has_unfinished():
        if mutate is not None and steps == after_steps:
            mutate()
        outs.update((o.request_id, o) for o in llm.step() if o.finished)
        steps += 1
    llm.engine.check()
    return [outs[r] for r in rids]


@pytest.mark.parametrize("field, value", BAD_VALUES)
@pytest.mark.parametrize("after_steps", [0, 2])  # before its prefill; after its fork, while decoding
@pytest.mark.parametrize("filtered", [False, True])  # the C++ sampler's batch, or the torch one (top-k)
def test_bad_sampling_values_fail_only_their_request(field, value, after_steps, filtered):
    prompts = [ids(30, 9), ids(31, 14), ids(32, 6)]
    good = [SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True),
            SamplingParams(n=3, temperature=0.9, max_tokens=6, seed=4, ignore_eos=True, logprobs=2),
            SamplingParams(n=1, temperature=0.7, top_k=20 if filtered else 0, max_tokens=6, seed=5, ignore_eos=True)]
    alone = drive(LLM(tiny(), kv_cache_tokens=1024, block_size=4), prompts, good)
    bad = SamplingParams(n=2, temperature=0.8, max_tokens=6, seed=6, ignore_eos=True)
    llm = LLM(tiny(), kv_cache_tokens=1024, block_size=4)
    outs = drive(llm, [ids(33, 11)] + prompts, [bad] + good, mutate=lambda: setattr(bad, field, value),
                 after_steps=after_steps)
    failed = outs[0]
    assert failed.finished and failed.error is not None
    assert f"sampling values were rejected: {field}" in failed.error and failed.request_id in failed.error
    assert [c.finish_reason for c in failed.outputs] == ["error"] * 2
    assert [len(c.token_ids) for c in failed.outputs] == [after_steps] * 2  # what it drew before, kept
    for got, want in zip(outs[1:], alone):
        assert got.error is None
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
        assert [c.logprobs for c in got.outputs] == [c.logprobs for c in want.outputs]
    assert llm.metrics()["failed_requests"] == 1 and llm.metrics()["failed_steps"] == 0
