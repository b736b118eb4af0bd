"""swiglu (Triton, interpreted on CPU) vs swiglu_ref, forward and gradients; the twin vs F.silu autograd."""
import pytest
import torch
import torch.nn.functional as F

from qlora_kit.kernels import swiglu
from tests.tolerances import tol

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = {"tiny": (2, 8), "irregular": (3, 5, 1187), "llama7b": (2, 11008)}


def _fwd_bwd(g, u, dy, backend):
    g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
    y = swiglu(g, u, backend=backend)
    y.backward(dy)
    return y, g.grad, u.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_matches_twin(shape, dtype):
    g, u, dy = (torch.randn(shape).to(dtype) for _ in range(3))
    for name, a, b in zip(("y", "dgate", "dup"), _fwd_bwd(g, u, dy, "triton"), _fwd_bwd(g, u, dy, "torch")):
        torch.testing.assert_close(a.float(), b.float(), **tol("swiglu", dtype), msg=name)


def test_twin_matches_autograd_llama_shape():
    g = torch.randn(4, 11008, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 11008, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 11008, dtype=torch.float64)
    y = F.silu(g) * u
    y.backward(dy)
    got = _fwd_bwd(g.detach().float(), u.detach().float(), dy.float(), "torch")
    for a, b in zip(got, (y, g.grad, u.grad)):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-5)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(4), torch.randn(5), backend="triton")
