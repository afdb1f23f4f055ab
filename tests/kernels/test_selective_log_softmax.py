"""Chunked selective log-softmax against the full fp32 log_softmax + gather: values and
gradients (fp32, odd shapes, chunks that do not divide N, ignored labels), and the Triton
logits -> log p(label) kernel (interpreter on CPU) against the same reference."""
from __future__ import annotations

import pytest
import torch

from rrm_kernels.selective_log_softmax import (IGNORE_INDEX, selective_log_softmax, selective_log_softmax_ref,
                                           token_logprobs)

SHAPES = [(1, 5, 3), (7, 33, 13), (37, 101, 19)]  # (N, V, H): odd on purpose


@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_full_log_softmax(n, v, h, chunk_size, temperature):
    gen = torch.Generator().manual_seed(n * 1000 + chunk_size)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::3] = IGNORE_INDEX if n > 1 else labels[::3]
    grad_out = torch.randn(n, generator=gen)

    out = selective_log_softmax(hidden, weight, labels, temperature, chunk_size)
    gh, gw = torch.autograd.grad(out, (hidden, weight), grad_out)
    ref = selective_log_softmax_ref(hidden, weight, labels, temperature)
    rh, rw = torch.autograd.grad(ref, (hidden, weight), grad_out)

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    assert (out[labels == IGNORE_INDEX] == 0).all()


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 8, 3, IGNORE_INDEX, 3])
    # the forward accumulates in fp32, so compare the analytic backward to finite differences loosely
    assert torch.autograd.gradcheck(lambda h, w: selective_log_softmax(h, w, labels, 0.9, 2), (hidden, weight),
                                    eps=1e-3, atol=2e-3, rtol=1e-2)


def test_bf16_inputs_stay_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 16, generator=gen).bfloat16()
    weight = torch.randn(50, 16, generator=gen).bfloat16()
    labels = torch.randint(0, 50, (9,), generator=gen)
    out = selective_log_softmax(hidden, weight, labels, chunk_size=4)
    torch.testing.assert_close(out, selective_log_softmax_ref(hidden, weight, labels), rtol=1e-6, atol=1e-5)
    ref32 = selective_log_softmax_ref(hidden.float(), weight.float(), labels)
    torch.testing.assert_close(out, ref32, rtol=0.05, atol=0.1)  # bf16 logits round to ~3 digits


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_logprobs_from_logits(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 300, generator=gen) * 3).to(dtype)
    logits[1, 5:40] = float("-inf")
    labels = torch.tensor([0, 299, 7, IGNORE_INDEX, 150, 3])
    out = token_logprobs(logits, labels, 0.8, backend=backend, chunk_size=4)
    ref = torch.log_softmax(logits.float() / 0.8, -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    ref[3] = 0.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_input_raises():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="outside"):
        selective_log_softmax(h, w, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="labels must have shape"):
        selective_log_softmax(h, w, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="weight"):
        selective_log_softmax(h, torch.randn(10, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(3, 10), torch.tensor([0, 1, 2]), temperature=0.0)


def test_triton_reduction_inside_the_autograd_function():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    weight = torch.randn(70, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 70, (11,), generator=gen)
    labels[4] = IGNORE_INDEX
    out = selective_log_softmax(hidden, weight, labels, 1.3, chunk_size=4, backend="triton")
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    ref = selective_log_softmax_ref(hidden, weight, labels, 1.3)
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_under_bf16_autocast_matches_autograd_of_the_same_forward(backend):
    """The reviewer's case (issue 13, B3): the trainer runs this forward under bf16 autocast and
    its backward outside it. The kernel's gradient must be autograd's gradient of the same bf16
    forward; it was 6-11% off when backward recomputed the logits in fp32 against the bf16 lse."""
    gen = torch.Generator().manual_seed(4)
    n, v, h = 64, 500, 32
    hidden = (torch.randn(n, h, generator=gen) * 3).requires_grad_()  # logits up to ~80, as in the report
    weight = torch.randn(v, h, generator=gen).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[5] = IGNORE_INDEX
    grad_out = torch.randn(n, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_log_softmax(hidden, weight, labels, 0.9, chunk_size=16, backend=backend)
        ref = selective_log_softmax_ref(hidden, weight, labels, 0.9)  # the same forward, differentiated by autograd
    gh, gw = torch.autograd.grad(out, (hidden, weight), grad_out)
    rh, rw = torch.autograd.grad(ref, (hidden, weight), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    # grad_hidden is the same bf16 matmul as autograd's; grad_weight sums the chunks in fp32 where
    # autograd rounds one bf16 product, so it may differ by bf16 rounding (2^-8 relative)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)
    assert ((gw - rw).norm() / rw.norm()).item() < 4e-3
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2 * rw.abs().max().item())
