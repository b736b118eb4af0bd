"""server.dequantize_bases: the explicit dense-base option swaps every NF4 projection and reports its memory cost."""
import pytest
import torch

from qlora_kit.models import Batch, NF4Linear
from tests.tolerances import tol

from ._tiny_serve import tiny_model

pytestmark = pytest.mark.unit


def test_dequantize_bases_reports_the_extra_bytes_and_keeps_the_logits(tmp_path):
    from qlora_kit.qserve.server import dequantize_bases

    _, model = tiny_model(tmp_path)
    layers = model.lora_layers()
    assert all(isinstance(m.base, NF4Linear) for m in layers.values())  # the 4-bit base is what loads
    four_bit = sum(b.nbytes for m in layers.values() for n, b in m.base.named_buffers() if n.startswith("weight_"))
    dense = sum(m.in_features * m.out_features * 4 for m in layers.values())  # fp32 compute in this tiny model
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = model(Batch(ids))
        n, extra = dequantize_bases(model)
        after = model(Batch(ids))
    assert n == len(layers) and extra == dense - four_bit > 0
    assert not any(isinstance(m.base, NF4Linear) for m in layers.values())
    # the same weights; the 4-bit base multiplies in kernels.nf4_matmul's order, the dense copy in F.linear's
    torch.testing.assert_close(before, after, **tol("nf4_matmul", torch.float32))
