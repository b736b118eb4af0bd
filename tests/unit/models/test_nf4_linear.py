"""NF4Linear: forward = dequant + matmul; backward = grad_out @ dequant(W), nothing weight-sized saved."""
import pytest
import torch
import torch.nn.functional as F

from qlora_kit.formats import dequantize_4bit, quantize_4bit
from qlora_kit.models import NF4Linear
from tests.tolerances import tol

pytestmark = pytest.mark.unit


def _layer(out_f, in_f, bias=False, backend=None, dtype=torch.float32):
    w = torch.randn(out_f, in_f, dtype=dtype) * 0.05
    layer = NF4Linear(in_f, out_f, bias=bias, backend=backend)
    packed = quantize_4bit(w, "nf4", 64, True)
    layer.set_packed(packed)
    if bias:
        layer.bias.data = torch.randn(out_f, dtype=dtype)
    return layer, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad_equal_autograd_on_dequantized_weight(dtype):
    layer, packed = _layer(48, 128, bias=True)
    w = dequantize_4bit(packed, dtype).requires_grad_(False)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, w, layer.bias.to(dtype))
    # the layer is kernels.nf4_matmul (its own fp32 accumulation order), F.linear the oracle
    torch.testing.assert_close(y, y_ref, **tol("nf4_matmul", dtype))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol("nf4_linear_grad", dtype))


@pytest.mark.filterwarnings("ignore:Input #0")
def test_gradcheck_fp64_style_on_fp32():
    """Finite differences agree with the custom backward (fp32 input, weight dequantized to fp32)."""
    layer, _ = _layer(8, 64)
    x = torch.randn(2, 64, dtype=torch.float32, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_backward_saves_no_weight_sized_tensor():
    layer, _ = _layer(256, 256)
    saved = []
    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert all(n < 256 * 256 for n in saved), saved
    assert layer.weight_data.grad is None and not layer.weight_data.requires_grad


@pytest.mark.parametrize("shape", [(16, 64), (24, 192)])
def test_triton_path_equals_torch_path(shape):
    torch_layer, packed = _layer(*shape, backend="torch")
    triton_layer = NF4Linear(shape[1], shape[0], backend="triton")
    triton_layer.set_packed(packed)
    x = torch.randn(3, shape[1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = torch_layer(x), triton_layer(x2)
    torch.testing.assert_close(y1, y2, **tol("nf4_matmul", torch.float32))  # fused tl.dot vs the twin's GEMM
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **tol("nf4_matmul", torch.float32))


def test_wrong_shape_is_refused():
    layer = NF4Linear(64, 16)
    with pytest.raises(ValueError, match=r"packed weight \(8, 64\) != \(16, 64\)"):
        layer.set_packed(quantize_4bit(torch.randn(8, 64)))




@pytest.mark.parametrize("share", [False, True])
def test_checkpoint_recompute_and_backward_share_one_decode(monkeypatch, share):
    from torch.utils.checkpoint import checkpoint

    from qlora_kit.kernels.cpu import nf4 as cpu_nf4

    layer, _ = _layer(96, 128)
    layer.share_decode = share
    decodes = []
    real = cpu_nf4.dequant_cpu
    monkeypatch.setattr(cpu_nf4, "dequant_cpu", lambda *a, **k: decodes.append(1) or real(*a, **k))
    x = torch.randn(2, 100, 128, requires_grad=True)  # 200 rows: a training-sized batch
    def block(t):  # tanh saves its output, so backward recomputes the block, as it does a decoder layer
        return torch.tanh(layer(t))

    checkpoint(block, x, use_reentrant=False).sum().backward()
    # forward, recompute, backward: 3 decodes; sharing drops the backward's
    assert len(decodes) == (2 if share else 3)
    grad = x.grad.clone()
    x.grad = None
    layer.share_decode = not share
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, grad)
