"""lora and lora_multi (Triton, interpreted) vs their twins, forward and all gradients; twins vs plain autograd."""
import pytest
import torch

from qlora_kit.kernels import lora, lora_multi
from tests.tolerances import tol

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M rows, K in, N out, rank)
SHAPES = {"tiny": (2, 16, 16, 4), "irregular": (7, 45, 37, 5), "llama7b_r8": (3, 4096, 4096, 8)}


def _close(name, a, r, dtype):
    scale = max(1.0, r.float().abs().max().item())
    torch.testing.assert_close(a.float() / scale, r.float() / scale, **tol("lora", dtype), msg=name)


def _grads(fn, tensors, dy):
    leaves = [t.detach().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lora_triton_matches_twin(shape, dtype):
    m, k, n, r = shape
    base, x = torch.randn(m, n).to(dtype), torch.randn(m, k).to(dtype)
    a, b = (torch.randn(r, k) / k**0.5).to(dtype), (torch.randn(n, r) / r**0.5).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    got = _grads(lambda *t: lora(*t, 0.5, backend="triton"), (base, x, a, b), dy)
    want = _grads(lambda *t: lora(*t, 0.5, backend="torch"), (base, x, a, b), dy)
    for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
        _close(name, g, w, dtype)


def test_lora_twin_matches_peft_formula():
    # PEFT LoraLayer.forward: result + lora_B(lora_A(dropout(x))) * scaling, differentiated in fp64
    m, k, n, r = 3, 4096, 4096, 8
    t = [torch.randn(m, n), torch.randn(m, k), torch.randn(r, k) / 64, torch.randn(n, r) / 3]
    dy = torch.randn(m, n)
    want = _grads(lambda bo, x, a, b: bo + (x @ a.t()) @ b.t() * 0.25, [v.double() for v in t], dy.double())
    got = _grads(lambda *v: lora(*v, 0.25, backend="torch"), t, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def _adapters(k, n, ranks, dtype):
    a = torch.cat([torch.randn(r, k) / k**0.5 for r in ranks]).to(dtype)
    b = torch.cat([torch.randn(n, r) / r**0.5 for r in ranks], dim=1).to(dtype)
    offsets = torch.tensor([0] + ranks).cumsum(0)
    scales = torch.tensor([2.0 / r for r in ranks])
    return a, b, offsets, scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 16, 16), (9, 45, 37)], ids=["tiny", "irregular"])
def test_lora_multi_triton_matches_twin(shape, dtype):
    m, k, n = shape
    a, b, offsets, scales = _adapters(k, n, [4, 8, 3], dtype)
    ids = torch.tensor([0, -1, 2, 1, 0, 2, -1, 1, 1][:m])
    base, x, dy = torch.randn(m, n).to(dtype), torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    got = _grads(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offsets, scales, backend="triton"), (base, x, a, b), dy)
    want = _grads(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offsets, scales, backend="torch"), (base, x, a, b), dy)
    for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
        _close(name, g, w, dtype)


def test_lora_multi_rows_match_single_adapter_lora():
    k, n = 4096, 64
    a, b, offsets, scales = _adapters(k, n, [8, 16], torch.float32)
    ids = torch.tensor([1, -1, 0, 1])
    base, x = torch.randn(4, n), torch.randn(4, k)
    y = lora_multi(base, x, ids, a, b, offsets, scales, backend="torch")
    torch.testing.assert_close(y[1], base[1])
    torch.testing.assert_close(y[2], lora(base[2:3], x[2:3], a[:8], b[:, :8], 2.0 / 8, backend="torch")[0])
    torch.testing.assert_close(y[0], lora(base[0:1], x[0:1], a[8:], b[:, 8:], 2.0 / 16, backend="torch")[0])


def test_lora_multi_rejects_bad_adapter_id():
    a, b, offsets, scales = _adapters(16, 16, [4], torch.float32)
    with pytest.raises(ValueError, match=r"lie in \[-1, 1\)"):
        lora_multi(torch.randn(2, 16), torch.randn(2, 16), torch.tensor([0, 1]), a, b, offsets, scales, backend="triton")


def test_lora_multi_kernels_have_no_host_sync():
    # the shrink/expand forward and the backward read ranks and ids on the device (no int(ranks.max()), no
    # offsets.tolist(), no nonzero); the wrapper's value checks read only host tensors (test below)
    from qlora_kit.kernels.lora import _LoraMulti
    from tests.unit.kernels.host_sync import no_host_reads

    a, b, offsets, scales = _adapters(45, 37, [4, 8, 3], torch.float32)
    ids = torch.tensor([0, -1, 2, 1, 0, 2])
    base, x = torch.randn(6, 37), torch.randn(6, 45).requires_grad_()
    a.requires_grad_(), b.requires_grad_()
    with no_host_reads():
        y = _LoraMulti.apply(base, x, ids, a, b, offsets, scales)
        y.backward(torch.ones_like(y))
    want = lora_multi(base, x.detach(), ids, a.detach(), b.detach(), offsets, scales, backend="torch")
    _close("y", y, want, torch.float32)


def test_lora_multi_rejects_bad_offsets():
    a, b, offsets, scales = _adapters(16, 16, [4, 2], torch.float32)
    with pytest.raises(ValueError, match="do not cut 6 rank rows"):
        lora_multi(torch.randn(2, 16), torch.randn(2, 16), torch.tensor([0, 1]), a, b, offsets + 1, scales, backend="triton")


def test_lora_multi_group_triton_is_the_per_projection_calls():
    # CUDA (Triton) has no fused group kernel: lora_multi_group runs each projection's Triton lora_multi, so it
    # follows the twin like them, gradients included
    from qlora_kit.kernels import lora_multi_group
    from qlora_kit.kernels.ref import lora_multi_group_ref

    per = [_adapters(45, n, [4, 8, 3], torch.float32) for n in (37, 16)]
    a, b, offsets, scales = [p[0] for p in per], [p[1] for p in per], per[0][2], per[0][3]
    ids = torch.tensor([0, -1, 2, 1, 0, 2, -1])
    x, bases = torch.randn(7, 45), [torch.randn(7, 37), torch.randn(7, 16)]
    grads = []
    for fn in (lambda *t: lora_multi_group(*t, backend="triton"), lora_multi_group_ref):
        leaves = [t.detach().requires_grad_() for t in [x, *a, *b]]
        ys = fn(bases, leaves[0], ids, leaves[1:3], leaves[3:5], offsets, scales)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        grads.append([*ys] + [t.grad for t in leaves])
    for name, g, w in zip(("y0", "y1", "dx", "dA0", "dA1", "dB0", "dB1"), *grads):
        _close(name, g, w, torch.float32)
