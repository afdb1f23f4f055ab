"""The fused sampler: its draws follow the exact filtered distribution (chi-square), it never leaves
the kept set, seeded draws do not depend on the batch, greedy is argmax, the Triton kernel equals
the torch reference token for token, and bad input raises a clear error.

The Triton kernel runs in the interpreter here (tests/kernels/conftest.py sets TRITON_INTERPRET),
which is slow: its shapes are tiny and its chi-square uses fewer draws than the reference's."""
from __future__ import annotations

import math

import pytest
import torch

import triton
import triton.language as tl

from rrm_kernels.rng import row_keys_tl, uniform_tl, uniform_torch
from rrm_kernels.sampling import (filter_mask_ref, gumbel_race_ref, sample, sample_ref, sample_triton,
                              top_logprobs_ref)

ALPHA = 1e-3  # chi-square significance level; every draw is seeded, so each test is deterministic


def params(b: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offsets=None, device="cpu"):
    def full(v, dtype):
        return v.to(dtype) if isinstance(v, torch.Tensor) else torch.full((b,), v, dtype=dtype)
    return dict(temperature=full(temperature, torch.float32), top_k=full(top_k, torch.int32),
                top_p=full(top_p, torch.float32), min_p=full(min_p, torch.float32), seeds=full(seed, torch.int64),
                offsets=torch.arange(b, dtype=torch.int64) if offsets is None else offsets)


def expected_distribution(x: list[float], top_k: int, top_p: float, min_p: float) -> list[float]:
    """The filtered, renormalised softmax of x (already divided by T), written independently of
    the library in float64 with plain loops: top-k, then top-p on the renormalised top-k set,
    then min-p relative to the most probable token."""
    v = len(x)
    order = sorted(range(v), key=lambda i: -x[i])
    keep = set(range(v))
    if 0 < top_k < v:
        kth = x[order[top_k - 1]]
        keep = {i for i in keep if x[i] >= kth}
    if top_p < 1.0:
        z = sum(math.exp(x[i]) for i in keep)
        mass, thresh = 0.0, None
        for i in order:
            if i in keep:
                mass += math.exp(x[i]) / z
                if mass >= top_p:
                    thresh = x[i]
                    break
        keep = {i for i in keep if x[i] >= thresh}
    if min_p > 0.0:
        top = max(x)
        keep = {i for i in keep if math.exp(x[i] - top) >= min_p}
    z = sum(math.exp(x[i]) for i in keep)
    return [math.exp(x[i]) / z if i in keep else 0.0 for i in range(v)]


def chi_square_p_value(counts: torch.Tensor, probs: list[float]) -> float:
    n = counts.sum().item()
    kept = [i for i, p in enumerate(probs) if p > 0]
    assert all(counts[i] == 0 for i, p in enumerate(probs) if p == 0), f"draws outside the kept set: {counts}"
    stat = sum((counts[i].item() - n * probs[i]) ** 2 / (n * probs[i]) for i in kept)
    df = len(kept) - 1
    if df == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


LOGITS_12 = torch.tensor([[2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -1.7, 0.6, 1.1, -3.0]])
CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, 0, 0.75, 0.0),
    (1.0, 0, 1.0, 0.3),
    (0.9, 7, 0.8, 0.05),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_draws_follow_the_filtered_distribution(case):
    temperature, top_k, top_p, min_p = case
    n = 20000
    kw = params(n, temperature, top_k, top_p, min_p, seed=1234)
    tokens, _ = sample_ref(LOGITS_12, torch.zeros(n, dtype=torch.int64), **kw)
    probs = expected_distribution((LOGITS_12[0] / temperature).tolist(), top_k, top_p, min_p)
    counts = torch.bincount(tokens, minlength=12)
    assert chi_square_p_value(counts, probs) > ALPHA, (counts, probs)


def test_triton_draws_follow_the_filtered_distribution():
    temperature, top_k, top_p, min_p = CASES[-1]  # all filters at once
    n = 640
    kw = params(n, temperature, top_k, top_p, min_p, seed=99)
    tokens, _ = sample_triton(LOGITS_12, torch.zeros(n, dtype=torch.int64), **kw)
    probs = expected_distribution((LOGITS_12[0] / temperature).tolist(), top_k, top_p, min_p)
    counts = torch.bincount(tokens, minlength=12)
    assert chi_square_p_value(counts, probs) > ALPHA, (counts, probs)


def test_chi_square_detects_a_wrong_distribution():
    # the test above can fail: draws from the unfiltered softmax are rejected against the filtered one
    n = 20000
    tokens, _ = sample_ref(LOGITS_12, torch.zeros(n, dtype=torch.int64), **params(n, seed=5))
    probs = expected_distribution(LOGITS_12[0].tolist(), 0, 0.75, 0.0)
    with pytest.raises(AssertionError):
        chi_square_p_value(torch.bincount(tokens, minlength=12), probs)
    probs = expected_distribution(LOGITS_12[0].tolist(), 0, 1.0, 0.0)
    bent = [p * (1.5 if i == 0 else 1.0) for i, p in enumerate(probs)]
    bent = [p / sum(bent) for p in bent]
    assert chi_square_p_value(torch.bincount(tokens, minlength=12), bent) < ALPHA


def random_batch(gen: torch.Generator, rows: int, vocab: int, b: int, dtype=torch.float32, ties: bool = False):
    if ties:  # few distinct values: exercises ties at the top-k / top-p thresholds
        logits = torch.randint(-3, 3, (rows, vocab), generator=gen).to(dtype)
    else:
        logits = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype)
    logits[0, :3] = float("-inf")  # masked vocabulary entries are legal
    kw = params(b,
                temperature=torch.where(torch.rand(b, generator=gen) < 0.2, 0.0, torch.rand(b, generator=gen) * 1.5 + 0.2),
                top_k=torch.where(torch.rand(b, generator=gen) < 0.5, 0, torch.randint(1, vocab + 3, (b,), generator=gen)),
                top_p=torch.where(torch.rand(b, generator=gen) < 0.5, 1.0, torch.rand(b, generator=gen) * 0.9 + 0.05),
                min_p=torch.where(torch.rand(b, generator=gen) < 0.5, 0.0, torch.rand(b, generator=gen) * 0.3),
                offsets=torch.randint(0, 1 << 40, (b,), generator=gen))
    kw["seeds"] = torch.randint(-(1 << 62), 1 << 62, (b,), generator=gen)
    return logits, torch.randint(0, rows, (b,), generator=gen), kw


def test_reference_kept_set_matches_independent_filters_and_draws_stay_inside():
    gen = torch.Generator().manual_seed(0)
    for ties in (False, True):
        logits, rows, kw = random_batch(gen, 6, 40, 200, ties=ties)
        greedy = kw["temperature"] == 0
        t = torch.where(greedy, 1.0, kw["temperature"])
        x = logits[rows] / t[:, None]
        keep = filter_mask_ref(x, kw["top_k"], kw["top_p"], kw["min_p"])
        tokens, _ = sample_ref(logits, rows, **kw)
        for i in range(len(rows)):
            probs = expected_distribution(x[i].double().tolist(), int(kw["top_k"][i]), float(kw["top_p"][i]),
                                          float(kw["min_p"][i]))
            assert keep[i].tolist() == [p > 0 for p in probs], i
            if not greedy[i]:
                assert probs[tokens[i]] > 0, f"sample {i} drew token {tokens[i]} outside the kept set"


@pytest.mark.parametrize("dtype,ties", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_triton_matches_reference_token_for_token(dtype, ties):
    gen = torch.Generator().manual_seed(1)
    logits, rows, kw = random_batch(gen, 4, 150, 32, dtype=dtype, ties=ties)  # 150: three blocks of 64
    ref_tokens, ref_lp = sample_ref(logits, rows, **kw)
    tri_tokens, tri_lp = sample_triton(logits, rows, **kw, block=64)
    assert torch.equal(tri_tokens, ref_tokens)
    torch.testing.assert_close(tri_lp, ref_lp, rtol=1e-5, atol=1e-5)
    x = logits[rows].float() / torch.where(kw["temperature"] == 0, 1.0, kw["temperature"])[:, None]
    kept = filter_mask_ref(x, kw["top_k"], kw["top_p"], kw["min_p"]).gather(1, tri_tokens[:, None])[:, 0]
    assert (kept | (kw["temperature"] == 0)).all(), "the Triton sampler drew a filtered-out token"
    # one sample per program, the layout a large vocabulary gets on a GPU
    one = sample_triton(logits, rows[:6], **{k: v[:6] for k, v in kw.items()}, block=64, block_b=1)
    assert torch.equal(one[0], ref_tokens[:6])
    full = torch.log_softmax(logits[rows].float() / torch.where(kw["temperature"] == 0, 1.0, kw["temperature"])[:, None], 1)
    torch.testing.assert_close(ref_lp, full.gather(1, ref_tokens[:, None])[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seeded_draw_is_independent_of_batch_composition_and_row_position(backend):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, generator=gen) * 2
    b = 6
    kw = params(b, temperature=0.8, top_k=torch.tensor([0, 10, 0, 4, 0, 0]), top_p=torch.tensor([1, 1, .9, 1, 1, .6]),
                seed=torch.tensor([11, 12, 13, 14, 11, 15]), offsets=torch.tensor([3, 3, 3, 3, 4, 9]))
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    tokens, lp = sample(logits, rows, **kw, backend=backend)
    # the same samples, shuffled, among other samples, with their logits moved to other rows
    other = torch.randn(4, 50, generator=gen)
    big_logits = torch.cat([other[:2], logits[2:3], other[2:], logits[1:2], logits[0:1]])  # rows 0,1,2 -> 6,5,2
    moved = {0: 6, 1: 5, 2: 2}
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    extra = params(3, temperature=1.0, seed=7)
    big_kw = {name: torch.cat([kw[name][perm], extra[name]]) for name in kw}
    big_rows = torch.cat([torch.tensor([moved[int(r)] for r in rows[perm]]), torch.tensor([0, 1, 3])])
    big_tokens, big_lp = sample(big_logits, big_rows, **big_kw, backend=backend)
    assert torch.equal(big_tokens[:b], tokens[perm])
    torch.testing.assert_close(big_lp[:b], lp[perm])
    # and a different offset gives fresh randomness (not a constant draw)
    shifted = dict(kw, offsets=kw["offsets"] + 1000)
    draws = {tuple(sample(logits, rows, **dict(shifted, offsets=kw["offsets"] + o), backend="torch")[0].tolist())
             for o in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_is_argmax_with_unscaled_logprob(backend):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 77, generator=gen)
    logits[2, 10] = logits[2, 40] = logits[2].max() + 1  # exact tie: the first index wins
    rows = torch.tensor([4, 2, 0, 2])
    kw = params(4, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)
    expected_lp = torch.log_softmax(logits[rows], 1).gather(1, logits[rows].argmax(1)[:, None])[:, 0]
    for all_greedy in (False, True):
        tokens, lp = sample(logits, rows, **kw, backend=backend, all_greedy=all_greedy)
        assert tokens.tolist() == logits[rows].argmax(1).tolist()
        assert tokens[1] == 10
        torch.testing.assert_close(lp, expected_lp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_raise_naming_the_row(backend, bad):
    logits = torch.randn(4, 20)
    logits[2, 7] = bad
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        sample(logits, torch.tensor([0, 2, 3]), **params(3), backend=backend)
    logits[2, 7] = 0.0
    logits[3] = float("-inf")
    with pytest.raises(ValueError, match=r"\[3\].*-inf"):
        sample(logits, torch.tensor([0, 3]), **params(2), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("greedy", [False, True])
def test_bad_rows_reported_as_status_instead_of_raising(backend, greedy):
    """return_status (what the engine uses): a NaN, +inf or all -inf row is flagged for the samples
    that read it and nothing is raised; every other sample gets the token it gets without them."""
    gen = torch.Generator().manual_seed(8)
    clean = torch.randn(5, 30, generator=gen)
    logits = clean.clone()
    logits[1, 3] = float("nan")
    logits[2, 9] = float("inf")
    logits[4] = float("-inf")
    rows = torch.tensor([0, 1, 2, 3, 4, 1, 0])
    kw = params(7, temperature=0.0 if greedy else 0.9, top_k=5)
    tokens, lp, status = sample(logits, rows, **kw, backend=backend, all_greedy=greedy, return_status=True)
    assert status.dtype == torch.int32 and (status != 0).tolist() == [False, True, True, False, True, True, False]
    ok = status == 0
    want_tokens, want_lp = sample(clean, rows, **kw, backend=backend, all_greedy=greedy)
    assert torch.equal(tokens[ok], want_tokens[ok])
    torch.testing.assert_close(lp[ok], want_lp[ok])
    assert ((tokens >= 0) & (tokens < 30)).all()  # bad rows still give in-range ids, never an index error
    # without return_status the same input still raises, naming the rows
    with pytest.raises(ValueError, match=r"rows \[1, 2"):
        sample(logits, rows, **kw, backend=backend, all_greedy=greedy)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_parameters_raise_clear_errors(backend):
    logits = torch.randn(2, 10)
    rows = torch.tensor([0, 1])
    cases = [
        (dict(top_p=torch.tensor([0.0, 1.0])), "top_p"),
        (dict(top_p=torch.tensor([1.0, 1.5])), "top_p"),
        (dict(temperature=torch.tensor([-1.0, 1.0])), "temperature"),
        (dict(min_p=torch.tensor([0.0, 2.0])), "min_p"),
        (dict(top_k=torch.tensor([-1, 0], dtype=torch.int32)), "top_k"),
        (dict(seeds=torch.tensor([0, 1, 2])), r"seeds must have shape \[2\]"),
        (dict(top_k=torch.tensor([1.0, 2.0])), "top_k must be an integer"),
        (dict(temperature=torch.tensor([1, 1])), "temperature must be a floating"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            sample(logits, rows, **{**params(2), **change}, backend=backend)
    with pytest.raises(ValueError, match="row_index"):
        sample(logits, torch.tensor([0, 2]), **params(2), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        sample(logits[0], rows, **params(2), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        sample(logits.long(), rows, **params(2), backend=backend)


def test_uniforms_are_uniform_and_in_the_open_interval():
    u = uniform_torch(torch.tensor([0, 1, -1]), torch.tensor([0, 0, 5]), 4096)
    assert (u > 0).all() and (u < 1).all()
    counts = torch.histc(u.flatten(), bins=16, min=0, max=1)
    n = u.numel()
    stat = ((counts - n / 16) ** 2 / (n / 16)).sum().item()
    assert torch.special.gammaincc(torch.tensor(7.5, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)) > ALPHA
    assert not torch.equal(u[0], u[1])


def test_top_logprobs_are_the_largest_of_the_scaled_distribution():
    logits = torch.randn(3, 30)
    ids, vals = top_logprobs_ref(logits, torch.tensor([2, 0]), torch.tensor([0.5, 0.0]), 4)
    full = torch.log_softmax(logits[[2, 0]] / torch.tensor([[0.5], [1.0]]), 1)
    torch.testing.assert_close(vals, full.gather(1, ids))
    assert ids[:, 0].tolist() == full.argmax(1).tolist()
    assert (vals[:, :-1] >= vals[:, 1:]).all()


@pytest.mark.parametrize("spread", [0.01, 1.0, 30.0])  # nearly flat rows keep every token a candidate
def test_pruned_race_equals_the_full_race(spread):
    gen = torch.Generator().manual_seed(4)
    b, v = 64, 500
    x = torch.randn(b, v, generator=gen) * spread
    keep = torch.rand(b, v, generator=gen) < 0.7
    keep[:, 0] = True
    seeds, offsets = torch.randint(0, 1 << 60, (b,), generator=gen), torch.randint(0, 1 << 20, (b,), generator=gen)
    for k in (keep, None):
        noisy = x - torch.log(-torch.log(uniform_torch(seeds, offsets, v)))
        full = (noisy if k is None else noisy.masked_fill(~k, float("-inf"))).argmax(dim=1)
        assert torch.equal(gumbel_race_ref(x, k, seeds, offsets), full)


@triton.jit
def _uniform_probe(seeds, offsets, out, V: tl.constexpr):
    b = tl.program_id(0)
    h1, h2 = row_keys_tl(tl.load(seeds + b), tl.load(offsets + b))
    idx = tl.arange(0, V)
    tl.store(out + b * V + idx, uniform_tl(h1, h2, idx))


def test_triton_and_torch_uniforms_agree_bit_for_bit():
    seeds = torch.tensor([0, 1, -5, (1 << 62) + 12345, -(1 << 63)], dtype=torch.int64)
    offsets = torch.tensor([0, 7, 1 << 40, 3, -1], dtype=torch.int64)
    out = torch.empty(5, 64)
    _uniform_probe[(5,)](seeds, offsets, out, V=64)
    assert torch.equal(out, uniform_torch(seeds, offsets, 64))
