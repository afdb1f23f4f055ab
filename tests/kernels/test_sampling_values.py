"""One sample's out-of-range values (temperature, top_k, top_p, min_p) in rrm_kernels.sampling:
with return_status they are that sample's status, never an error for the batch (issue 22, item 1).
Triton runs in its interpreter here (tests/kernels/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from rrm_kernels.sampling import STATUS_BAD_VALUES, sample


def params(b: int) -> dict[str, torch.Tensor]:
    return dict(temperature=torch.full((b,), 0.9), top_k=torch.full((b,), 7, dtype=torch.int32),
                top_p=torch.full((b,), 0.95), min_p=torch.full((b,), 0.01), seeds=torch.full((b,), 3),
                offsets=torch.arange(b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_values_of_one_sample_are_its_status_not_an_error(backend):
    """A sample whose temperature, top_k, top_p or min_p is out of range comes back as
    STATUS_BAD_VALUES and the others draw exactly what they draw without it; a row_index out of
    range still raises (the caller's bug, not a sample's value)."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 40, generator=gen) * 2
    rows = torch.tensor([0, 1, 2, 0, 1])
    base = params(5)
    want_tokens, want_lp = sample(logits, rows, **base, backend=backend)
    cases = [("temperature", float("inf")), ("temperature", float("nan")), ("temperature", -1.0),
             ("top_p", 0.0), ("top_p", float("nan")), ("min_p", 1.5), ("top_k", -3)]
    keep = [0, 1, 2, 4]
    for name, value in cases:
        kw = {k: v.clone() for k, v in base.items()}
        kw[name][3] = value
        tokens, lp, status = sample(logits, rows, **kw, backend=backend, return_status=True)
        assert status.tolist() == [0, 0, 0, STATUS_BAD_VALUES, 0], (name, value)
        assert torch.equal(tokens[keep], want_tokens[keep]), (name, value)
        torch.testing.assert_close(lp[keep], want_lp[keep])
        assert 0 <= int(tokens[3]) < 40  # a meaningless but valid id
        with pytest.raises(ValueError, match=name):  # without return_status: the clear error, as before
            sample(logits, rows, **kw, backend=backend)
    with pytest.raises(ValueError, match="row_index"):
        sample(logits, torch.tensor([0, 3, 1, 1, 1]), **base, backend=backend, return_status=True)


def test_bad_values_and_bad_logits_together():
    logits = torch.randn(2, 16)
    logits[1, 2] = float("nan")
    kw = params(3)
    kw["temperature"][0] = float("inf")
    _, _, status = sample(logits, torch.tensor([0, 1, 0]), **kw, backend="torch", return_status=True)
    assert status.tolist() == [STATUS_BAD_VALUES, 1, 0]
