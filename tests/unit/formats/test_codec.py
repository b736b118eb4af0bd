import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from qlora_kit.formats import (
    NonFiniteWeight,
    ShapeMismatch,
    UnsupportedBlocksize,
    UnsupportedDtype,
    UnsupportedQuantType,
    decode_absmax,
    dequantize_4bit,
    quantize_4bit,
    spec,
    sqnr_db,
)
from tests.tolerances import tol

pytestmark = pytest.mark.unit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# odd element counts, a partial last block, one element, multi-block rows
SHAPES = ((64, 64), (3, 67), (1, 1001), (7, 129), (1,), (4097,), (33, 256))


def _weight(shape, dtype, zero_blocks=True):
    w = torch.randn(shape) * 0.02
    flat = w.view(-1)
    if zero_blocks and flat.numel() > 200:
        flat[:64] = 0  # an all-zero full block
        flat[-3:] = 0
    return w.to(dtype)


def _bnb_dequant_reference(q, st):
    """bitsandbytes' torch reference dequant (its AVX-512 C kernel is wrong for blocksize 128..1024)."""
    code = bnbf.get_4bit_type(st.quant_type, device="cpu")
    return _dequantize_4bit_compute(q.reshape(-1), st.absmax, code, st.blocksize, st.shape, st.dtype)


@pytest.mark.parametrize("quant_type", spec.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", spec.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_and_absmax_bit_exact_with_bitsandbytes(quant_type, blocksize, dtype):
    for shape in SHAPES:
        w = _weight(shape, dtype)
        ours = quantize_4bit(w, quant_type, blocksize, double_quant=False)
        q, st = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(ours.data, q), (shape, "packed codes differ")
        assert torch.equal(ours.state.absmax, st.absmax), (shape, "absmax differs")
        assert torch.equal(dequantize_4bit(ours).reshape(-1), _bnb_dequant_reference(q, st).reshape(-1))


@pytest.mark.parametrize("quant_type", spec.QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_equals_bitsandbytes_dequantize_4bit(quant_type, dtype):
    # bitsandbytes' AVX-512 C kernel is wrong for blocksizes 128..1024 (FORMAT.md §6); the torch
    # reference comparison above covers those.
    blocksizes = (64, 2048, 4096) if torch.backends.cpu.get_cpu_capability() == "AVX512" else spec.BLOCKSIZES
    for blocksize in blocksizes:
        w = _weight((96, 320), dtype)
        ours = quantize_4bit(w, quant_type, blocksize, double_quant=False)
        q, st = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(dequantize_4bit(ours), bnbf.dequantize_4bit(q, st))


@pytest.mark.parametrize("quant_type", spec.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", (64, 256, 4096))
def test_double_quant_decodes_absmax_like_bitsandbytes(quant_type, blocksize):
    w = _weight((300, 1000), torch.bfloat16)
    ours = quantize_4bit(w, quant_type, blocksize, double_quant=True)
    q, st = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(ours.data, q)
    assert torch.equal(ours.state.nested.absmax, st.state2.absmax)
    assert ours.state.nested.offset.item() == st.offset.item()
    theirs = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
    ours_abs = decode_absmax(ours.state)
    scale = st.state2.absmax.repeat_interleave(256)[: ours_abs.numel()]
    assert torch.all((ours_abs - theirs).abs() <= tol("dq_absmax_vs_bnb")["atol"] * scale + 1e-7)
    differing = (ours.state.absmax != st.absmax).float().mean().item()
    assert differing < 0.01, f"{differing:.2%} of absmax codes differ from bitsandbytes' lookup table"
    # nearest-level coding is never worse than the lookup table
    plain = quantize_4bit(w, quant_type, blocksize, double_quant=False).state.absmax
    assert (ours_abs - plain).abs().sum() <= (theirs - plain).abs().sum()


def test_all_zero_blocks_and_odd_tail():
    w = torch.zeros(2, 65)
    w[1, :] = torch.linspace(-1, 1, 65)
    p = quantize_4bit(w, "nf4", 64, double_quant=False)
    assert p.state.absmax[0].item() == 0.0
    assert torch.equal(dequantize_4bit(p)[0], torch.zeros(65))
    assert p.data.shape == (65, 1)  # 130 codes -> 65 bytes
    odd = quantize_4bit(torch.ones(3), "nf4", 64, double_quant=False)
    assert odd.data.flatten().tolist() == [0xFF, 0xF7]  # the pad nibble is the code of 0 (7)


@pytest.mark.parametrize("quant_type", spec.QUANT_TYPES)
def test_round_trip_error_is_within_half_a_level_gap(quant_type):
    w = torch.randn(64, 512)
    p = quantize_4bit(w, quant_type, 64, double_quant=False)
    levels = spec.code_table(quant_type).sort().values
    half_gap = ((levels[1:] - levels[:-1]).max() / 2).item()
    err = (dequantize_4bit(p) - w).abs().view(-1, 64)
    assert torch.all(err <= half_gap * p.state.absmax.unsqueeze(1) * (1 + 1e-6))
    assert sqnr_db(w, dequantize_4bit(p)) > 18.0 if quant_type == "nf4" else 15.0


def test_sqnr_db_is_inf_when_exact_and_finite_otherwise():
    x = torch.randn(100)
    assert sqnr_db(x, x) == float("inf")
    assert 19.9 < sqnr_db(x, x * 1.1) < 20.1  # noise is 0.1 x: 20 dB


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_with_its_name(value):
    w = torch.randn(4, 64)
    w[2, 5] = value
    with pytest.raises(NonFiniteWeight, match=r"layers\.3\.mlp\.up_proj\.weight: 1 NaN/Inf"):
        quantize_4bit(w, name="layers.3.mlp.up_proj.weight")


@pytest.mark.parametrize("blocksize", [32, 100, 8192, 0])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(UnsupportedBlocksize, match=rf"w: blocksize={blocksize} is not supported"):
        quantize_4bit(torch.randn(128), blocksize=blocksize, name="w")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8])
def test_unsupported_dtype(dtype):
    with pytest.raises(UnsupportedDtype, match=r"w: dtype torch\.\w+ cannot be quantized"):
        quantize_4bit(torch.zeros(128, dtype=dtype), name="w")


def test_unsupported_quant_type_and_empty_tensor():
    with pytest.raises(UnsupportedQuantType, match="w: quant_type='int4'"):
        quantize_4bit(torch.randn(128), quant_type="int4", name="w")
    with pytest.raises(ShapeMismatch, match=r"w: empty tensor of shape \(0, 4\)"):
        quantize_4bit(torch.zeros(0, 4), name="w")
