"""The Triton dequant kernel (interpreted on CPU) against its torch twin, bit for bit."""
import os
import subprocess
import sys

import pytest
import torch

from qlora_kit.formats import quantize_4bit
from qlora_kit.kernels import BackendError, dequant
from qlora_kit.kernels.ref import dequant_ref
from tests.conftest import requires_cuda
from tests.tolerances import tol

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TINY = ((2, 64), (4, 128))
IRREGULAR = ((33, 67), (7, 129), (1, 1001), (5,), (3, 1823))


def _check(shape, quant_type, blocksize, double_quant, dtype, device="cpu"):
    w = torch.randn(shape, device=device).to(dtype)
    packed = quantize_4bit(w, quant_type, blocksize, double_quant)
    out = dequant(packed, dtype, backend="triton")
    ref = dequant_ref(packed, dtype)
    assert out.shape == ref.shape == w.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol("dequant", dtype))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("double_quant", (True, False))
def test_triton_equals_twin_tiny_and_irregular(dtype, quant_type, double_quant):
    for shape in TINY + IRREGULAR:
        for blocksize in (64, 256):
            _check(shape, quant_type, blocksize, double_quant, dtype)


@pytest.mark.unit
@pytest.mark.parametrize("blocksize", (128, 512, 1024, 2048, 4096))
def test_triton_equals_twin_every_blocksize(blocksize):
    _check((9, 1000), "nf4", blocksize, True, torch.bfloat16)


@pytest.mark.slow
def test_triton_equals_twin_llama7b_projection():
    _check((4096, 4096), "nf4", 64, True, torch.bfloat16)


@pytest.mark.unit
def test_dispatch_rule():
    packed = quantize_4bit(torch.randn(4, 64))
    assert torch.equal(dequant(packed), dequant_ref(packed))  # CPU -> twin
    with pytest.raises(BackendError, match="backend='cuda-graph': use one of"):
        dequant(packed, backend="cuda-graph")
    with pytest.raises(ValueError, match="output dtype torch.int8 is not one of"):
        dequant(packed, torch.int8)


@pytest.mark.unit
def test_forcing_triton_without_the_interpreter_is_an_error_not_a_fallback():
    code = ("from qlora_kit.formats import quantize_4bit; from qlora_kit.kernels import dequant; import torch\n"
            "dequant(quantize_4bit(torch.randn(4, 64)), backend='triton')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "needs TRITON_INTERPRET=1" in run.stderr


@pytest.mark.gpu
@requires_cuda()
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_equals_twin(dtype):
    for shape in TINY + IRREGULAR + ((4096, 4096), (14336, 4096)):
        _check(shape, "nf4", 64, True, dtype, device="cuda")


@pytest.mark.unit
def test_without_triton_installed_the_cpu_path_runs_and_triton_is_a_clear_error():
    # Triton is a Linux-only dependency: with `import triton` failing, the kernels import, CPU runs the twin
    # bit for bit, and asking for Triton names the missing package instead of crashing at a launch.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from qlora_kit.formats import quantize_4bit, dequantize_4bit\n"
            "from qlora_kit.kernels import BackendError, dequant\n"
            "p = quantize_4bit(torch.randn(8, 64))\n"
            "assert torch.equal(dequant(p), dequantize_4bit(p))\n"
            "try:\n"
            "    dequant(p, backend='triton')\n"
            "except BackendError as e:\n"
            "    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "backend='triton' needs Triton, which is not installed (pip install triton)"


@pytest.mark.unit
def test_no_host_sync():
    # the nested offset is read by the kernel through a pointer, not by float(offset) on the host
    from tests.unit.kernels.host_sync import no_host_reads

    packed = quantize_4bit(torch.randn(8, 256), "nf4", 64, True)
    with no_host_reads():
        out = dequant(packed, torch.bfloat16, backend="triton")
    torch.testing.assert_close(out, dequant_ref(packed, torch.bfloat16), **tol("dequant", torch.bfloat16))
