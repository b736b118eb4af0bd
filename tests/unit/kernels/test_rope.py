"""rope (Triton, interpreted on CPU) vs rope_ref, forward and gradient; the twin vs HF's apply_rotary_pos_emb."""
import pytest
import torch

from qlora_kit.kernels import rope
from tests.tolerances import tol

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (batch, num_heads, seq, head_dim), and whether cos/sin carry a batch dimension
SHAPES = {"tiny": ((1, 2, 3, 8), False), "irregular": ((2, 3, 7, 34), True), "llama7b": ((1, 32, 8, 128), True)}


def _cos_sin(batch, seq, dim, batched, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pos = torch.arange(seq, dtype=torch.float32).unsqueeze(0) + torch.arange(batch).unsqueeze(1) * 3.0
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    return (cos, sin) if batched else (cos[0], sin[0])


def _fwd_bwd(x, cos, sin, dy, backend):
    x = x.detach().requires_grad_()
    y = rope(x, cos, sin, backend=backend)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,batched", SHAPES.values(), ids=SHAPES.keys())
def test_triton_matches_twin(shape, batched, dtype):
    b, _, s, d = shape
    cos, sin = (t.to(dtype) for t in _cos_sin(b, s, d, batched))
    x, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    for name, a, r in zip(("y", "dx"), _fwd_bwd(x, cos, sin, dy, "triton"), _fwd_bwd(x, cos, sin, dy, "torch")):
        torch.testing.assert_close(a.float(), r.float(), **tol("rope", dtype), msg=name)


def test_twin_matches_hf_llama_shape():
    # HF modeling_llama: q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1), autograd in fp64
    shape = (2, 32, 16, 128)
    cos, sin = (t.double() for t in _cos_sin(2, 16, 128, True))
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    rot = torch.cat([-x[..., 64:], x[..., :64]], dim=-1)
    y = x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)
    y.backward(dy)
    got = _fwd_bwd(x.detach().float(), cos.float(), sin.float(), dy.float(), "torch")
    for a, r in zip(got, (y, x.grad)):
        torch.testing.assert_close(a.double(), r.detach(), rtol=1e-5, atol=1e-5)


def test_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        rope(torch.randn(1, 1, 2, 5), torch.randn(2, 5), torch.randn(2, 5), backend="triton")
