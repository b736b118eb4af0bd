"""kernels/cpu/dense.py linear16 (nf4.c qk_gemm16: a 16-bit weight GEMM in fp32) vs its twin F.linear in fp32."""
import pytest
import torch

from qlora_kit.kernels.cpu import available, linear16, linear16_ref

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64, 40), (7, 96, 33), (30, 576, 1000)], ids=["decode", "odd", "tiles"])
def test_linear16_matches_twin(shape, dtype):
    if not available():
        pytest.skip("no C compiler: linear16 runs its twin")
    m, k, n = shape
    x = torch.randn(2, m, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    got = linear16(x, w)
    assert got.shape == (2, m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, linear16_ref(x, w), rtol=1e-5, atol=1e-5)
    # batch invariance: a row's result does not depend on the rows beside it
    assert torch.equal(linear16(x[:, :1], w), got[:, :1])


def test_linear16_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        linear16(torch.randn(3, 16), torch.randn(8, 24).bfloat16())


def test_linear16_large_batches_take_blas_over_slices_and_match_twin():
    from qlora_kit.kernels.cpu.dense import SLICE
    from qlora_kit.kernels.cpu.nf4 import FUSED_MAX_ROWS

    x = torch.randn(FUSED_MAX_ROWS + 3, 32).bfloat16()
    w = (torch.randn(SLICE + 100, 32) / 32**0.5).bfloat16()
    torch.testing.assert_close(linear16(x, w), linear16_ref(x, w), rtol=1e-5, atol=1e-5)
