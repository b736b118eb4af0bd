"""The model's RMSNorm, RoPE and SwiGLU run kernels/ (the twins on CPU) and round exactly as transformers' Llama
does: bit-equal outputs in bf16, fp16 and fp32, and gradients through them."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from qlora_kit.models.llama import RMSNorm
from qlora_kit.models.rope import apply_rope
from qlora_kit.kernels import swiglu

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_equals_transformers_bit_for_bit(dtype):
    x = (torch.randn(3, 7, 45) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(45)).to(dtype)
    ours, hf = RMSNorm(45, 1e-5), LlamaRMSNorm(45, eps=1e-5)
    ours.weight.data, hf.weight.data = w.clone(), w.clone()
    assert torch.equal(ours(x), hf(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_equals_transformers_bit_for_bit(dtype):
    q, k = torch.randn(2, 4, 5, 16).to(dtype), torch.randn(2, 2, 5, 16).to(dtype)
    angles = torch.arange(5.0).view(1, 5, 1) * torch.rand(2, 1, 8)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), hq) and torch.equal(apply_rope(k, cos, sin), hk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_equals_transformers_mlp_product_bit_for_bit(dtype):
    gate, up = (torch.randn(3, 7, 37) * 4).to(dtype), torch.randn(3, 7, 37).to(dtype)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)


def test_gradients_flow_through_the_kernels():
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    cos, sin = torch.rand(2, 5, 8), torch.rand(2, 5, 8)
    norm = RMSNorm(8, 1e-6)
    y = swiglu(apply_rope(norm(x), cos, sin), x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    n = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6)
    r = n * cos.unsqueeze(1) + torch.cat([-n[..., 4:], n[..., :4]], -1) * sin.unsqueeze(1)
    (F.silu(r) * x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
