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
    assert torch.equal(y, y_ref)
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
    torch_layer, packed = _layer(*shape)
    triton_layer = NF4Linear(shape[1], shape[0], backend="triton")
    triton_layer.set_packed(packed)
    x = torch.randn(3, shape[1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, y2 = torch_layer(x), triton_layer(x2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_wrong_shape_is_refused():
    layer = NF4Linear(64, 16)
    with pytest.raises(ValueError, match=r"packed weight \(8, 64\) != \(16, 64\)"):
        layer.set_packed(quantize_4bit(torch.randn(8, 64)))


def test_keep_dequantized_gives_the_same_bits_without_grad():
    layer, _ = _layer(32, 64, bias=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = layer(x)
        layer.keep_dequantized = True
        assert torch.equal(layer(x), ref) and layer._dequantized is not None
