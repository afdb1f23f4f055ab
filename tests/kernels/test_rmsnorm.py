import pytest
import torch

from rrm_kernels.rmsnorm import rms_norm, rms_norm_ref
from rrm_engine.model.decoder import RMSNorm

# fp16 outputs are rounded twice (after the norm, after the weight): one fp16 ulp near 4 is 4e-3
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 40), (7, 576)])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
def test_rms_norm_matches_reference(dtype, shape, weight_dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    res = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[-1], generator=gen).to(dtype if weight_dtype == "same" else weight_dtype)
    out = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), **TOL[dtype])
    out, new_res = rms_norm(x, w, 1e-6, residual=res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, residual=res)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)  # the add is rounded the same way


def test_rms_norm_matches_the_decoder_module():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
    x = torch.randn(6, 48, generator=gen)
    torch.testing.assert_close(rms_norm(x, norm.weight.detach(), 1e-5), norm(x).detach(), atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), 1e-6, residual=torch.randn(2, 7))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), 1e-6, residual=x.half())
