"""LoraLinear: y = base(x) + s B A dropout(x), several adapters by id, per-row selection."""
import math

import pytest
import torch
import torch.nn.functional as F

from qlora_kit.formats import dequantize_4bit, quantize_4bit
from qlora_kit.models import LoraLinear, NF4Linear
from tests.tolerances import tol

pytestmark = pytest.mark.unit


def _lora(in_f=64, out_f=32):
    base = NF4Linear(in_f, out_f)
    packed = quantize_4bit(torch.randn(out_f, in_f) * 0.05)
    base.set_packed(packed)
    return LoraLinear(base, in_f, out_f), dequantize_4bit(packed, torch.float32)


def test_fresh_adapter_equals_base_and_has_kaiming_a():
    layer, w = _lora()
    layer.add_adapter(0, rank=8, scale=2.0)
    x = torch.randn(2, 3, 64)
    assert torch.equal(layer(x, torch.tensor([0, 0])), layer.base(x))
    # the base is kernels.nf4_matmul (fp32 accumulation in its own order), not this F.linear
    torch.testing.assert_close(layer.base(x), F.linear(x, w), **tol("nf4_matmul", torch.float32))
    assert torch.count_nonzero(layer.lora_b["0"]) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    a = layer.lora_a["0"]
    assert a.abs().max() <= bound and a.std() > bound / 3
    assert set(layer.adapter_params()) == {"lora_a.0", "lora_b.0"}


def test_output_and_gradients_equal_autograd_on_dequantized_weight():
    layer, w = _lora()
    layer.add_adapter(3, rank=4, scale=16 / 4)
    with torch.no_grad():
        layer.lora_b["3"].normal_()
    a_ref = layer.lora_a["3"].detach().clone().requires_grad_(True)
    b_ref = layer.lora_b["3"].detach().clone().requires_grad_(True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x, torch.tensor([3, 3]))
    y_ref = F.linear(x_ref, w) + 4.0 * (x_ref @ a_ref.t() @ b_ref.t())
    torch.testing.assert_close(y, y_ref, **tol("lora_grad"))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, ref in ((x.grad, x_ref.grad), (layer.lora_a["3"].grad, a_ref.grad), (layer.lora_b["3"].grad, b_ref.grad)):
        torch.testing.assert_close(got, ref, **tol("lora_grad"))


def test_mixed_rows_equal_each_row_alone():
    layer, _ = _lora()
    for i, r in ((1, 2), (2, 8), (3, 16)):
        layer.add_adapter(i, rank=r, scale=1.0 / r)
        with torch.no_grad():
            layer.lora_b[str(i)].normal_()
    ids = torch.tensor([1, -1, 3, 2, 1])
    x = torch.randn(5, 4, 64)
    mixed = layer(x, ids)
    for row, i in enumerate(ids.tolist()):
        alone = layer(x[row:row + 1], torch.tensor([i]))
        torch.testing.assert_close(mixed[row:row + 1], alone, **tol("mixed_batch"))
    assert torch.equal(mixed[1], layer(x[1:2], None)[0])


def test_dropout_only_in_training_and_remove():
    layer, w = _lora()
    layer.add_adapter(0, rank=4, scale=1.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b["0"].normal_()
    x = torch.randn(1, 8, 64)
    layer.eval()
    assert torch.equal(layer(x, torch.tensor([0])), layer(x, torch.tensor([0])))
    layer.train()
    assert not torch.equal(layer(x, torch.tensor([0])), layer(x, torch.tensor([0])))
    layer.remove_adapter(0)
    assert layer.adapter_ids == [] and torch.equal(layer(x, torch.tensor([0])), layer.base(x))


def test_bad_adapter_arguments():
    layer, _ = _lora()
    with pytest.raises(ValueError, match="adapter_id=-1"):
        layer.add_adapter(-1, rank=4, scale=1.0)
    with pytest.raises(ValueError, match="rank=0"):
        layer.add_adapter(0, rank=0, scale=1.0)
