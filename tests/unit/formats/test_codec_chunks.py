"""formats.quantize_4bit codes whole blocks a chunk at a time: every chunk size gives the one-pass bytes (which
tests/unit/formats/test_codec.py checks against bitsandbytes), and a non-finite value is named whatever chunk it is in."""
import pytest
import torch

from qlora_kit.formats import NonFiniteWeight, quantize_4bit
from tests.conftest import requires_cuda

pytestmark = pytest.mark.unit


# 6720 elements (whole chunks of 960); 2145 (odd: padded last byte, tail block); 3100 (tail in the last chunk)
@pytest.mark.parametrize("shape", [(96, 70), (33, 65), (31, 100)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunked_equals_whole_tensor_bytes(shape, double_quant, quant_type):
    w = torch.randn(shape, dtype=torch.bfloat16)
    whole = quantize_4bit(w, quant_type, 64, double_quant, name="w", chunk_elems=w.numel())  # one pass
    parts = quantize_4bit(w, quant_type, 64, double_quant, name="w", chunk_elems=1000)  # -> 960-element chunks
    assert torch.equal(parts.data, whole.data)
    assert torch.equal(parts.state.absmax, whole.state.absmax)
    assert parts.state.shape == whole.state.shape and parts.state.dtype == whole.state.dtype
    if double_quant:
        assert torch.equal(parts.state.nested.absmax, whole.state.nested.absmax)
        assert torch.equal(parts.state.nested.offset, whole.state.nested.offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_equals_whole_for_other_dtypes_and_extremes(dtype):
    w = torch.randn(40, 128, dtype=dtype)
    w[3] = 0  # an all-zero block: absmax 0, clamped divisor
    w[7, 5] = 1e4 if dtype == torch.float16 else 1e30
    whole = quantize_4bit(w, "nf4", 64, True, name="w", chunk_elems=w.numel())
    parts = quantize_4bit(w, "nf4", 64, True, name="w", chunk_elems=256)
    assert torch.equal(parts.data, whole.data) and torch.equal(parts.state.absmax, whole.state.absmax)


def test_chunked_names_the_tensor_on_nan():
    w = torch.randn(64, 64)
    w[60, 3] = float("nan")
    with pytest.raises(NonFiniteWeight, match="layer.weight: 1 NaN/Inf"):
        quantize_4bit(w, "nf4", 64, True, name="layer.weight", chunk_elems=512)
    w[60, 3] = float("inf")
    with pytest.raises(NonFiniteWeight, match="layer.weight: 1 NaN/Inf"):
        quantize_4bit(w, "nf4", 64, True, name="layer.weight", chunk_elems=512)


@requires_cuda()
@pytest.mark.gpu
def test_cuda_chunked_equals_cpu_bytes():
    w = torch.randn(300, 1000, dtype=torch.bfloat16)
    cpu = quantize_4bit(w, "nf4", 64, True, name="w", chunk_elems=4096)
    gpu = quantize_4bit(w.cuda(), "nf4", 64, True, name="w", chunk_elems=4096).to("cpu")
    assert torch.equal(gpu.data, cpu.data) and torch.equal(gpu.state.absmax, cpu.state.absmax)
