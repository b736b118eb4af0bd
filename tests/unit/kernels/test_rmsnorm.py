"""rmsnorm (Triton, interpreted on CPU) vs rmsnorm_ref, forward and gradients; the twin vs HF's formula."""
import pytest
import torch

from qlora_kit.kernels import rmsnorm
from tests.tolerances import tol

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = {"tiny": (2, 8), "irregular": (3, 7, 181), "llama7b": (2, 4096)}


def _fwd_bwd(x, w, dy, backend):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = rmsnorm(x, w, 1e-6, backend=backend)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_matches_twin(shape, dtype):
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape).to(dtype)
    got = _fwd_bwd(x, w, dy, "triton")
    want = _fwd_bwd(x, w, dy, "torch")
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        scale = 1.0 if name != "dw" else max(1.0, r.float().abs().max().item())
        torch.testing.assert_close(g.float() / scale, r.float() / scale, **tol("rmsnorm", dtype), msg=name)


def test_twin_matches_hf_formula_llama_shape():
    # HF LlamaRMSNorm: w * (x * rsqrt(mean(x^2) + eps)), differentiated by autograd in fp64.
    x = torch.randn(4, 4096, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(4, 4096, dtype=torch.float64)
    y_hf = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    y_hf.backward(dy)
    got = _fwd_bwd(x.detach().float(), w.detach().float(), dy.float(), "torch")
    for g, r in zip(got, (y_hf, x.grad, w.grad)):
        torch.testing.assert_close(g.double(), r.detach(), rtol=1e-4, atol=1e-4)


def test_rejects_long_rows():
    with pytest.raises(ValueError, match="exceeds 65536"):
        rmsnorm(torch.randn(1, 65537), torch.ones(65537), backend="triton")
