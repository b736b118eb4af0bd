"""kernels/cpu (the compiled C path CPU tensors take) against the torch twins: dequant bit for bit, the matmul
within the twin's tolerance, forward and backward, on the STYLE.md shape sets."""
import os
import subprocess
import sys

import pytest
import torch

from qlora_kit.formats import quantize_4bit
from qlora_kit.kernels import dequant, nf4_matmul
from qlora_kit.kernels.cpu import available, dequant_cpu, native_16bit_matmul, nf4_matmul_cpu
from qlora_kit.kernels.cpu.nf4 import FUSED_MAX_ROWS
from qlora_kit.kernels.ref import dequant_ref, nf4_matmul_ref
from tests.tolerances import tol

pytestmark = pytest.mark.unit

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPES = ((1, 64), (3, 7), (1823, 781))  # tiny, odd (padded last byte, ragged last block)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_the_compiled_kernels_are_built_here():
    # CI has gcc: the fast path must really run, or every other test here would compare the twin with itself
    assert available()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequant_is_bit_exact_with_the_twin(shape, quant_type, double_quant):
    w = torch.randn(shape) * torch.logspace(-30, 3, shape[0]).unsqueeze(1)  # tiny absmax: subnormal outputs
    for blocksize in (64, 256, 4096):
        packed = quantize_4bit(w.to(torch.bfloat16), quant_type, blocksize, double_quant)
        for dtype in DTYPES:
            assert torch.equal(_bits(dequant_cpu(packed, dtype)), _bits(dequant_ref(packed, dtype))), (blocksize, dtype)
            via = dequant_cpu(packed, dtype, fp32_via=True)
            assert via.dtype == torch.float32
            assert torch.equal(via, dequant_ref(packed, dtype).float()), (blocksize, dtype)


def test_dequant_of_a_llama_7b_projection_is_bit_exact_with_the_twin():
    packed = quantize_4bit(torch.randn(4096, 4096, dtype=torch.bfloat16), "nf4", 64, True)
    for dtype in DTYPES:
        assert torch.equal(_bits(dequant_cpu(packed, dtype)), _bits(dequant_ref(packed, dtype))), dtype


def test_dequant_is_the_same_on_one_and_two_threads():
    packed = quantize_4bit(torch.randn(2048, 1024))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dequant_cpu(packed, torch.bfloat16)
        torch.set_num_threads(2)
        two = dequant_cpu(packed, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(one), _bits(two))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1])
@pytest.mark.parametrize("save_decoded", [False, True])
def test_matmul_forward_and_backward_match_the_twin(dtype, rows, save_decoded):
    for n, k in ((96, 64), (781, 1823), (200, 48)):
        packed = quantize_4bit(torch.randn(n, k) * 0.05, "nf4", 64, True)
        bias = torch.randn(n, dtype=dtype, requires_grad=True)
        x = torch.randn(rows, k, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        bias_ref = bias.detach().clone().requires_grad_(True)
        y = nf4_matmul_cpu(x, packed, bias, save_decoded)
        y_ref = nf4_matmul_ref(x_ref, packed, bias_ref)
        assert y.dtype == dtype and y.shape == (rows, n)
        torch.testing.assert_close(y, y_ref, **tol("nf4_matmul", dtype))
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol("nf4_matmul", dtype))
        torch.testing.assert_close(bias.grad, bias_ref.grad, **tol("nf4_matmul", dtype))


def test_the_wrappers_take_the_compiled_path_on_cpu_and_the_twin_when_forced():
    packed = quantize_4bit(torch.randn(64, 64))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(nf4_matmul(x, packed), nf4_matmul_cpu(x, packed, None, False))
    assert torch.equal(nf4_matmul(x, packed, backend="torch"), nf4_matmul_ref(x, packed))
    assert torch.equal(dequant(packed), dequant_cpu(packed, torch.float32))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_short_absmax_is_refused_before_any_kernel_reads_it(backend):
    packed = quantize_4bit(torch.randn(64, 64), "nf4", 64, double_quant=False)
    bad = type(packed)(packed.data, type(packed.state)(**{**packed.state.__dict__, "absmax": packed.state.absmax[:3]}))
    with pytest.raises(ValueError, match=r"dequant: absmax torch.float32 \(3,\) does not hold 64 fp32 scales"):
        dequant(bad, backend=backend)
    with pytest.raises(ValueError, match=r"nf4_matmul: absmax torch.float32 \(3,\) does not hold 64"):
        nf4_matmul(torch.randn(1, 64), bad, backend=backend)


@pytest.mark.parametrize("env, says", [
    ({"QLORA_KIT_CPU_KERNELS": "0"}, "QLORA_KIT_CPU_KERNELS=0: 4-bit CPU kernels run the torch twins (slower)"),
    ({"CC": "/nonexistent/cc", "PATH": "/nonexistent"}, "no C compiler (cc, gcc or clang; $CC): 4-bit CPU kernels"),
])
def test_without_the_compiled_kernels_one_line_says_so_and_the_twin_runs(tmp_path, env, says):
    code = ("import torch\nfrom qlora_kit.formats import quantize_4bit, dequantize_4bit\n"
            "from qlora_kit.kernels import dequant\n"
            "p = quantize_4bit(torch.randn(8, 64)); assert torch.equal(dequant(p), dequantize_4bit(p))\n"
            "dequant(p); print('ok')\n")
    full = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path), **env}
    run = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("qlora-kit:")]
    assert len(lines) == 1 and says in lines[0], run.stderr


@torch.no_grad()
def test_inference_rows_do_not_depend_on_the_batch_they_share():
    # the fused kernel gives a row the same bits alone, in any batch, on any thread split (nf4.c qk_gemm)
    packed = quantize_4bit(torch.randn(200, 576) * 0.05, "nf4", 64, True)
    x = torch.randn(150, 576, dtype=torch.bfloat16)
    full = nf4_matmul(x[:FUSED_MAX_ROWS], packed)
    for rows in (slice(0, 1), slice(7, 12), slice(3, FUSED_MAX_ROWS)):
        assert torch.equal(nf4_matmul(x[rows], packed), full[rows])
    if not native_16bit_matmul(torch.bfloat16):  # larger batches too, where no native 16-bit GEMM wins
        assert torch.equal(nf4_matmul(x, packed)[:FUSED_MAX_ROWS], full)
