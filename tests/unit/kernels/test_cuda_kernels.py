"""Every kernel on CUDA through the path CUDA really runs (tl.dot on 16-bit tensor cores, dequant + cuBLAS for fp32
and large batches), forward and backward, against its torch twin on the same device: odd shapes (1823 x 781) and
Llama-8B projections (4096 x 4096, 14336 x 4096). Skipped without a GPU; run with the interpreter off:

    QLORA_KIT_NO_INTERPRET=1 python -m pytest -q -p no:cacheprovider -m gpu tests/unit/kernels/test_cuda_kernels.py
"""
import pytest
import torch

from qlora_kit.formats import quantize_4bit
from qlora_kit.kernels import adamw8bit, chunked_cross_entropy, lora, lora_multi, nf4_matmul, rmsnorm, rope, swiglu
from tests.conftest import requires_cuda
from tests.tolerances import tol

pytestmark = [pytest.mark.gpu, requires_cuda()]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (out N, in K): odd (dense route: K is not whole blocks), Llama-8B q_proj and up_proj
WEIGHTS = {"odd": (781, 1823), "odd_blocks": (781, 1856), "llama8b_q": (4096, 4096), "llama8b_up": (14336, 4096)}
BATCHES = (1, 16, 17, 512)  # GEMV, fused M<=16, fused 17..64, dense


def _close(name, got, want, op, dtype):
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol(op, dtype), msg=name)


def _run(fn, tensors, dy):
    leaves = [t.detach().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_nf4_matmul(weight, dtype):
    n, k = weight
    packed = quantize_4bit(torch.randn(n, k, device="cuda").to(dtype) * 0.02, "nf4", 64, True)
    bias = torch.randn(n, device="cuda").to(dtype)
    for m in BATCHES:
        x, dy = torch.randn(m, k, device="cuda").to(dtype), torch.randn(m, n, device="cuda").to(dtype)
        got = _run(lambda xx, bb: nf4_matmul(xx, packed, bb), (x, bias), dy)
        want = _run(lambda xx, bb: nf4_matmul(xx, packed, bb, backend="torch"), (x, bias), dy)
        for name, g, w in zip(("y", "dx", "dbias"), got, want):
            _close(f"m={m} {name}", g, w, "nf4_matmul", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [(781, 1823), (14336, 4096)], ids=["odd", "llama8b_up"])
def test_lora(weight, dtype):
    n, k = weight
    m, r = 37, 16
    t = [torch.randn(m, n, device="cuda"), torch.randn(m, k, device="cuda"), torch.randn(r, k, device="cuda") / k**0.5,
         torch.randn(n, r, device="cuda") / r**0.5]
    t = [v.to(dtype) for v in t]
    dy = torch.randn(m, n, device="cuda").to(dtype)
    got = _run(lambda *v: lora(*v, 2.0), t, dy)
    want = _run(lambda *v: lora(*v, 2.0, backend="torch"), t, dy)
    for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
        _close(name, g, w, "lora", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [(781, 1823), (4096, 4096)], ids=["odd", "llama8b_q"])
def test_lora_multi(weight, dtype):
    n, k = weight
    ranks = [8, 16, 3, 64]
    a = torch.cat([torch.randn(r, k, device="cuda") / k**0.5 for r in ranks]).to(dtype)
    b = torch.cat([torch.randn(n, r, device="cuda") / r**0.5 for r in ranks], dim=1).to(dtype)
    offsets = torch.tensor([0] + ranks, device="cuda").cumsum(0)
    scales = torch.tensor([2.0 / r for r in ranks], device="cuda")
    for m in (1, 16, 513):
        ids = torch.randint(-1, len(ranks), (m,), device="cuda")
        base, x, dy = (torch.randn(m, c, device="cuda").to(dtype) for c in (n, k, n))
        got = _run(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offsets, scales), (base, x, a, b), dy)
        want = _run(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offsets, scales, backend="torch"), (base, x, a, b), dy)
        for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
            _close(f"m={m} {name}", g, w, "lora", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise(dtype):
    g, u, dy = (torch.randn(1823, 781, device="cuda").to(dtype) for _ in range(3))
    for name, a, b in zip(("y", "dg", "du"), _run(swiglu, (g, u), dy), _run(lambda *v: swiglu(*v, backend="torch"), (g, u), dy)):
        _close(f"swiglu {name}", a, b, "swiglu", dtype)
    for shape in ((3, 7, 61, 128), (2, 32, 512, 128)):
        x, dyr = torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)
        cos, sin = torch.randn(shape[2], shape[3], device="cuda").to(dtype), torch.randn(shape[2], shape[3], device="cuda").to(dtype)
        for a, b in zip(_run(lambda xx: rope(xx, cos, sin), (x,), dyr), _run(lambda xx: rope(xx, cos, sin, backend="torch"), (x,), dyr)):
            _close("rope", a, b, "rope", dtype)
    for n in (781, 4096):
        x, w, dyn = torch.randn(37, n, device="cuda").to(dtype), torch.randn(n, device="cuda").to(dtype), torch.randn(37, n, device="cuda").to(dtype)
        for a, b in zip(_run(rmsnorm, (x, w), dyn), _run(lambda *v: rmsnorm(*v, backend="torch"), (x, w), dyn)):
            _close("rmsnorm", a, b, "rmsnorm", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_llama_vocab(dtype):
    h, w = torch.randn(67, 4096, device="cuda").to(dtype), (torch.randn(128256, 4096, device="cuda") * 0.01).to(dtype)
    labels = torch.randint(0, 128256, (67,), device="cuda")
    labels[::5] = -100
    got = _run(lambda hh: chunked_cross_entropy(hh, w, labels, chunk_size=32), (h,), torch.tensor(1.0, device="cuda"))
    want = _run(lambda hh: chunked_cross_entropy(hh, w, labels, chunk_size=32, backend="torch"), (h,), torch.tensor(1.0, device="cuda"))
    for a, b in zip(got, want):
        _close("cross_entropy", a, b, "cross_entropy", dtype)


def test_adamw8bit():
    from qlora_kit.trainer.optim import signed_dynamic_map, unsigned_dynamic_map

    n = 14336 * 16 + 77
    q1, q2 = signed_dynamic_map().cuda(), unsigned_dynamic_map().cuda()
    p0 = torch.randn(n, device="cuda")
    runs = {}
    for backend in ("auto", "torch"):
        torch.manual_seed(1)
        p = p0.clone()
        states = [torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(n, dtype=torch.uint8, device="cuda"),
                  torch.zeros(-(-n // 256), device="cuda"), torch.zeros(-(-n // 256), device="cuda")]
        for t in range(1, 4):
            adamw8bit(p, torch.randn(n, device="cuda"), *states, q1, q2, t, 1e-2, 0.9, 0.999, 1e-8, 0.01, backend=backend)
        runs[backend] = p
    torch.testing.assert_close(runs["auto"], runs["torch"], **tol("adamw8bit"))
