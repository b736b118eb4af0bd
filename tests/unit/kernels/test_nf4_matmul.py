"""nf4_matmul (Triton, interpreted) vs nf4_matmul_ref, forward and grad_x; the twin vs dequant + plain autograd."""
import pytest
import torch

from qlora_kit.formats import dequantize_4bit, quantize_4bit
from qlora_kit.kernels import nf4_matmul
from tests.tolerances import tol

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M tokens, N out, K in, blocksize, double_quant)
SHAPES = {"tiny": (2, 16, 64, 64, True), "irregular": (5, 37, 96, 64, False), "irregular_dq": (19, 70, 130, 128, True),
          "fused_irregular": (17, 37, 192, 64, False), "fused_dq": (3, 70, 256, 128, True)}


def _fwd_bwd(x, packed, bias, dy, backend):
    x = x.detach().requires_grad_()
    b = bias.detach().requires_grad_() if bias is not None else None
    y = nf4_matmul(x, packed, b, backend=backend)
    y.backward(dy)
    return y, x.grad, (b.grad if b is not None else torch.zeros(()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_matches_twin(shape, dtype):
    m, n, k, bs, dq = shape
    packed = quantize_4bit(torch.randn(n, k).to(dtype), "nf4", bs, dq)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    bias = torch.randn(n).to(dtype) if n % 2 else None
    got, want = _fwd_bwd(x, packed, bias, dy, "triton"), _fwd_bwd(x, packed, bias, dy, "torch")
    for name, a, r in zip(("y", "dx", "dbias"), got, want):
        # a K-long dot rounds to the output dtype once; compare on the scale of the largest output
        scale = max(1.0, r.float().abs().max().item())
        torch.testing.assert_close(a.float() / scale, r.float() / scale, **tol("nf4_matmul", dtype), msg=name)


def test_fp4_and_3d_input():
    packed = quantize_4bit(torch.randn(32, 64), "fp4", 64, True)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(nf4_matmul(x, packed, backend="triton"), nf4_matmul(x, packed, backend="torch"),
                               **tol("nf4_matmul", torch.float32))


def test_twin_matches_dequant_autograd_llama_shape():
    # Llama-7B q_proj (4096 x 4096), NF4 + double quant, bf16 activations, against dequantize + F.linear.
    packed = quantize_4bit(torch.randn(4096, 4096, dtype=torch.bfloat16) * 0.02, "nf4", 64, True)
    w = dequantize_4bit(packed, torch.float32)
    x = torch.randn(4, 4096)
    dy = torch.randn(4, 4096)
    xr = x.clone().requires_grad_()
    (xr @ w.t()).backward(dy)
    y, dx, _ = _fwd_bwd(x, packed, None, dy, "torch")
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-4, atol=1e-4)


def test_rejects_wrong_in_features():
    packed = quantize_4bit(torch.randn(16, 64))
    with pytest.raises(ValueError, match="does not fit the 2-d weight"):
        nf4_matmul(torch.randn(2, 32), packed, backend="triton")


@pytest.mark.parametrize("m", [1, 16, 17])
def test_no_host_sync_forward_backward(m):
    # the nested offset c reaches the kernel as a pointer: no float(offset) per call (a sync per layer on CUDA,
    # illegal in CUDA-graph capture); the dense route (fp32) decodes through dequant, which has none either
    from tests.unit.kernels.host_sync import no_host_reads

    packed = quantize_4bit(torch.randn(48, 128), "nf4", 64, True)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(m, 128).to(dtype).requires_grad_()
        with no_host_reads():
            y = nf4_matmul(x, packed, backend="triton")
            y.backward(torch.ones_like(y))
        assert x.grad.shape == x.shape


def test_decode_tiles_fill_the_sms():
    # M = 1 at N = 4096 (a Llama-8B projection): at least one program per SM on H100 and A100
    from qlora_kit.kernels._device import A100, H100
    from qlora_kit.kernels.nf4_matmul import _config

    for target in (H100, A100):
        for m in (1, 16):
            cfg = _config(m, target)
            assert -(-4096 // cfg["BLOCK_O"]) >= target.sms, (target, m, cfg)


@pytest.mark.parametrize("m,dtype,k,fused", [(16, torch.bfloat16, 128, True), (64, torch.float16, 256, True),
                                             (65, torch.bfloat16, 128, False), (1, torch.float32, 128, False),
                                             (1, torch.bfloat16, 96, False)])
def test_route(m, dtype, k, fused):
    # fp32 (wants IEEE) and large batches (compute-bound) go to dequant + torch.matmul (cuBLAS on CUDA)
    from qlora_kit.kernels.nf4_matmul import _fused

    assert _fused(m, dtype, k, 64) is fused


def test_large_batch_route_matches_twin():
    packed = quantize_4bit(torch.randn(40, 128), "nf4", 64, True)
    x = torch.randn(65, 128).to(torch.bfloat16)
    torch.testing.assert_close(nf4_matmul(x, packed, backend="triton").float(), nf4_matmul(x, packed, backend="torch").float(),
                               **tol("nf4_matmul", torch.bfloat16))
