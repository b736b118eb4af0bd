"""kernels/cpu/lora.py (the CPU path of lora / lora_multi) vs the twins in kernels/ref/lora.py, forward and gradients."""
import pytest
import torch

from qlora_kit.kernels import lora, lora_multi
from qlora_kit.kernels.ref import lora_multi_ref, lora_ref
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
def test_lora_cpu_matches_twin(shape, dtype):
    m, k, n, r = shape
    base, x = torch.randn(m, n).to(dtype), torch.randn(m, k).to(dtype)
    a, b = (torch.randn(r, k) / k**0.5).to(dtype), (torch.randn(n, r) / r**0.5).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    got = _grads(lambda *t: lora(*t, 0.5, backend="torch"), (base, x, a, b), dy)
    want = _grads(lambda *t: lora_ref(*t, 0.5), (base, x, a, b), dy)
    for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
        _close(name, g, w, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_under_low_precision_activations(dtype):
    # the model's case: fp32 A/B masters, bf16/fp16 x and base; the CPU path computes in fp32 like the twin
    m, k, n, r = SHAPES["irregular"]
    base, x, dy = torch.randn(m, n).to(dtype), torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    a, b = torch.randn(r, k) / k**0.5, torch.randn(n, r) / r**0.5
    got = _grads(lambda *t: lora(*t, 0.5, backend="torch"), (base, x, a, b), dy)
    want = _grads(lambda *t: lora_ref(*t, 0.5), (base, x, a, b), dy)
    for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
        assert g.dtype == w.dtype
        _close(name, g, w, dtype)
    offsets, scales = torch.tensor([0, 2, r]), torch.tensor([1.0, 0.5])
    ids = torch.tensor([1, 0, -1, 1, 1, 0, 0])
    y = lora_multi(base, x, ids, a, b, offsets, scales, backend="torch")
    assert y.dtype == dtype
    _close("multi", y, lora_multi_ref(base, x, ids, a, b, offsets, scales), dtype)


def _adapters(k, n, ranks, dtype):
    a = torch.cat([torch.randn(r, k) / k**0.5 for r in ranks]).to(dtype)
    b = torch.cat([torch.randn(n, r) / r**0.5 for r in ranks], dim=1).to(dtype)
    offsets = torch.tensor([0] + ranks).cumsum(0)
    scales = torch.tensor([2.0 / max(r, 1) for r in ranks])
    return a, b, offsets, scales


# ranks: packed by rank (views of lora_a / lora_b), interleaved (gathered), an empty adapter, one adapter only
RANKS = {"by_rank": [4, 4, 8, 8, 8], "interleaved": [8, 4, 8, 3, 4], "empty": [4, 0, 4], "one": [5]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 5, 45, 37)], ids=["tiny", "irregular"])
def test_lora_multi_cpu_matches_twin(shape, ranks, dtype):
    bsz, t, k, n = shape
    a, b, offsets, scales = _adapters(k, n, ranks, dtype)
    gen = torch.Generator().manual_seed(len(ranks) * 7 + t)
    ids = torch.randint(-1, len(ranks), (bsz, t), generator=gen)
    ids[0, 0], ids[-1, -1] = len(ranks) - 1, -1
    base, x, dy = (torch.randn(bsz, t, n).to(dtype), torch.randn(bsz, t, k).to(dtype), torch.randn(bsz, t, n).to(dtype))
    got = _grads(lambda bo, xx, aa, bb: lora_multi(bo, xx, ids, aa, bb, offsets, scales, backend="torch"), (base, x, a, b), dy)
    want = _grads(lambda bo, xx, aa, bb: lora_multi_ref(bo, xx, ids, aa, bb, offsets, scales), (base, x, a, b), dy)
    for name, g, w in zip(("y", "dbase", "dx", "dA", "dB"), got, want):
        _close(name, g, w, dtype)


def test_lora_multi_cpu_all_rows_base_only_is_base():
    a, b, offsets, scales = _adapters(16, 8, [4, 2], torch.float32)
    base = torch.randn(3, 8)
    y = lora_multi(base, torch.randn(3, 16), torch.tensor([-1, -1, -1]), a, b, offsets, scales, backend="torch")
    assert torch.equal(y, base)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_the_same_error_on_every_backend(backend):
    # validated before dispatch: the CPU path and the Triton path refuse the same inputs with the same message
    a, b, offsets, scales = _adapters(16, 16, [4], torch.float32)
    base, x = torch.randn(2, 16), torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"lie in \[-1, 1\)"):
        lora_multi(base, x, torch.tensor([0, 1]), a, b, offsets, scales, backend=backend)
    with pytest.raises(ValueError, match="do not cut 4 rank rows"):
        lora_multi(base, x, torch.tensor([0, 0]), a, b, torch.tensor([0, 3]), scales, backend=backend)
    with pytest.raises(ValueError, match="A and B must share one"):
        lora(base, x, a.double(), b, 1.0, backend=backend)
    with pytest.raises(ValueError, match="do not fit"):
        lora(base, x, a, b[:8], 1.0, backend=backend)
    with pytest.raises(ValueError, match="must be on one device"):
        lora(base, x, a.to("meta"), b.to("meta"), 1.0, backend=backend)


def test_transposed_b_layout_and_reused_ids_follow_the_twin():
    # LoraLinear hands B as the transpose of a contiguous (sum r_i, N); the row grouping is reused while the
    # same ids tensor comes back unchanged, and redone after an in-place write or with other offsets
    a, b, offsets, scales = _adapters(45, 37, [4, 8, 4, 8], torch.float32)
    bt = b.t().contiguous().t()
    base, x = torch.randn(2, 6, 37), torch.randn(2, 6, 45)
    ids = torch.tensor([[0, 1, 2, 3, -1, 1], [2, 2, 2, 0, 3, 3]])
    for _ in range(2):
        got = lora_multi(base, x, ids, a, bt, offsets, scales, backend="torch")
        torch.testing.assert_close(got, lora_multi_ref(base, x, ids, a, b, offsets, scales), **tol("lora"))
        ids[0, 4] = 1
    few = torch.tensor([0, 4, 12])
    got = lora_multi(base, x, ids.clamp(max=1), a[:12], bt[:, :12], few, scales[:2], backend="torch")
    torch.testing.assert_close(got, lora_multi_ref(base, x, ids.clamp(max=1), a[:12], b[:, :12], few, scales[:2]),
                               **tol("lora"))


@pytest.mark.parametrize("used", [[1, 3, 4], [0, 5], [2]], ids=["span_with_a_gap", "gathered", "one"])
def test_subsets_of_one_rank_follow_the_twin(used):
    # six rank-4 adapters; rows use a subset: a span at most half absent is taken as views, a sparse one gathered
    a, b, offsets, scales = _adapters(45, 37, [4] * 6, torch.float32)
    ids = torch.tensor([used[i % len(used)] for i in range(7)] + [-1])
    base, x = torch.randn(8, 37), torch.randn(8, 45)
    got = lora_multi(base, x, ids, a, b, offsets, scales, backend="torch")
    torch.testing.assert_close(got, lora_multi_ref(base, x, ids, a, b, offsets, scales), **tol("lora"))


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
def test_inference_rows_kernel_matches_twin_and_grouped_bmm(ranks, dtype, w_dtype):
    # without autograd lora_multi runs kernels/cpu/lora.c (a GEMV pair per row); with it, the grouped bmm. Both
    # round in w's dtype and follow the twin; K = 45 and N = 37 exercise the kernel's 16-lane tails
    from qlora_kit.kernels.cpu import available

    if not available():
        pytest.skip("no C compiler: the CPU kernels run their torch twins")
    a, b, offsets, scales = _adapters(45, 37, ranks, w_dtype)
    ids = torch.randint(-1, len(ranks), (3, 5), generator=torch.Generator().manual_seed(3))
    base, x = torch.randn(3, 5, 37).to(dtype), torch.randn(3, 5, 45).to(dtype)
    with torch.no_grad():
        rows = lora_multi(base, x, ids, a, b, offsets, scales, backend="torch")
    with torch.enable_grad():
        grouped = lora_multi(base, x.requires_grad_(), ids, a, b, offsets, scales, backend="torch").detach()
    assert rows.dtype == dtype
    assert torch.equal(rows[ids == -1], base[ids == -1])
    _close("rows vs twin", rows, lora_multi_ref(base, x.detach(), ids, a, b, offsets, scales), min(dtype, w_dtype, key=_eps))
    _close("rows vs grouped bmm", rows, grouped, min(dtype, w_dtype, key=_eps))
    r0 = int(offsets[1])
    if r0:  # one adapter for every row (kernels.lora): the same rows kernel, the same result as in a mixed batch
        with torch.no_grad():
            single = lora(base, x.detach(), a[:r0], b[:, :r0], float(scales[0]), backend="torch")
        _close("single vs twin", single, lora_ref(base, x.detach(), a[:r0], b[:, :r0], float(scales[0])),
               min(dtype, w_dtype, key=_eps))
        assert torch.equal(single[ids == 0], rows[ids == 0])


def _eps(dtype):
    return -torch.finfo(dtype).eps


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_rows_kernel_result_of_a_row_does_not_depend_on_its_neighbours(w_dtype):
    # lora.c runs consecutive rows of one adapter as tiles of up to 4 (a prompt's tokens) and a lone row on its own
    # path: every row must equal the same row computed alone, whatever the runs around it (K, N past the 16- and
    # 32-lane blocks, with tails), and follow the twin
    from qlora_kit.kernels.cpu import available

    if not available():
        pytest.skip("no C compiler: the CPU kernels run their torch twins")
    k, n = 83, 301
    a, b, offsets, scales = _adapters(k, n, [16, 16, 8], w_dtype)
    ids = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 1, 1, 1, -1, 2, 2, 2, 0, 1, 1])  # runs of 5, 1, 2, 3, 3
    base, x = torch.randn(len(ids), n).bfloat16(), torch.randn(len(ids), k).bfloat16()
    with torch.no_grad():
        rows = lora_multi(base, x, ids, a, b, offsets, scales, backend="torch")
        for m in range(len(ids)):
            alone = lora_multi(base[m:m + 1], x[m:m + 1], ids[m:m + 1], a, b, offsets, scales, backend="torch")
            assert torch.equal(alone[0], rows[m]), m
    _close("rows vs twin", rows, lora_multi_ref(base, x, ids, a, b, offsets, scales), torch.bfloat16)


def _group(k, ns, ranks, dtype):
    """P projections (out sizes ns) of one packing: A_p, B_p per projection, offsets and scales shared."""
    per = [_adapters(k, n, ranks, dtype) for n in ns]
    return [p[0] for p in per], [p[1] for p in per], per[0][2], per[0][3]


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
def test_lora_multi_group_matches_twin_and_equals_separate_calls(ranks, dtype, w_dtype):
    # q/k/v-like projections sharing x: the group call (one lora.c call) equals the P lora_multi calls bit for bit,
    # written into the base outputs with reuse_base, and follows the twin; N = 37, 16, 301 exercise the tails and the
    # expand's column blocks, runs of one adapter the tiles
    from qlora_kit.kernels import lora_multi_group
    from qlora_kit.kernels.ref import lora_multi_group_ref

    k, ns = 45, (37, 16, 301)
    a, b, offsets, scales = _group(k, ns, ranks, w_dtype)
    ids = torch.randint(-1, len(ranks), (3, 5), generator=torch.Generator().manual_seed(5))
    ids[1] = len(ranks) - 1  # a prompt's run of one adapter (tiles of 4 and 1)
    x = torch.randn(3, 5, k).to(dtype)
    bases = [torch.randn(3, 5, n).to(dtype) for n in ns]
    with torch.no_grad():
        separate = [lora_multi(bo, x, ids, aa, bb, offsets, scales, backend="torch") for bo, aa, bb in zip(bases, a, b)]
        grouped = lora_multi_group(bases, x, ids, a, b, offsets, scales, backend="torch")
        kept = [bo.clone() for bo in bases]
        inplace = lora_multi_group(kept, x, ids, a, b, offsets, scales, backend="torch", reuse_base=True)
    want = lora_multi_group_ref(bases, x, ids, a, b, offsets, scales)
    for p, n in enumerate(ns):
        assert grouped[p].shape == (3, 5, n) and grouped[p].dtype == dtype
        assert torch.equal(grouped[p], separate[p]), p
        assert torch.equal(inplace[p], separate[p]), p
        _close(f"group {p} vs twin", grouped[p], want[p], min(dtype, w_dtype, key=_eps))
    from qlora_kit.kernels.cpu import available

    if available():  # the rows kernel wrote into the bases it was given
        assert all(y.data_ptr() == bo.data_ptr() for y, bo in zip(inplace, kept))


def test_lora_multi_group_gradients_follow_the_twin():
    # with autograd the group is P lora_multi calls: every output's gradients reach x, each A_p and each B_p
    from qlora_kit.kernels import lora_multi_group
    from qlora_kit.kernels.ref import lora_multi_group_ref

    k, ns = 45, (37, 16)
    a, b, offsets, scales = _group(k, ns, [4, 8, 4], torch.float32)
    ids = torch.tensor([[0, 1, 2], [2, -1, 0]])
    x = torch.randn(2, 3, k)
    bases = [torch.randn(2, 3, n) for n in ns]
    dys = [torch.randn(2, 3, n) for n in ns]
    grads = []
    for fn in (lambda *t: lora_multi_group(*t, backend="torch"), lora_multi_group_ref):
        leaves = [t.detach().requires_grad_() for t in [x, *a, *b]]
        ys = fn(bases, leaves[0], ids, leaves[1:3], leaves[3:5], offsets, scales)
        torch.autograd.backward(ys, dys)
        grads.append([ys[0], ys[1]] + [t.grad for t in leaves])
    for name, g, w in zip(("y0", "y1", "dx", "dA0", "dA1", "dB0", "dB1"), *grads):
        _close(name, g, w, torch.float32)


def test_lora_multi_group_rejects_projections_of_different_packings():
    from qlora_kit.kernels import lora_multi_group

    a, b, offsets, scales = _group(16, (8, 8), [4, 4], torch.float32)
    x, bases = torch.randn(3, 16), [torch.randn(3, 8), torch.randn(3, 8)]
    with pytest.raises(ValueError, match="different rank rows"):
        lora_multi_group(bases, x, torch.tensor([0, 1, -1]), [a[0], a[1][:4]], [b[0], b[1][:, :4]], offsets, scales)
    with pytest.raises(ValueError, match="one of each per projection"):
        lora_multi_group(bases, x, torch.tensor([0, 1, -1]), a[:1], b, offsets, scales)


def test_remembered_host_values_and_arguments_follow_in_place_changes():
    # the ids' range, the offsets' bounds and the weights' ctypes arguments are remembered per tensor: an in-place
    # write to the ids or offsets is checked again (the same errors), and A's data swapped under the same tensor
    # object is read from its new place
    a, b, offsets, scales = _adapters(16, 8, [4, 4], torch.float32)
    bt = b.t().contiguous().t()
    base, x, ids = torch.randn(3, 8), torch.randn(3, 16), torch.tensor([0, 1, -1])
    with torch.no_grad():
        lora_multi(base, x, ids, a, bt, offsets, scales)
        ids[1] = 2
        with pytest.raises(ValueError, match=r"lie in \[-1, 2\)"):
            lora_multi(base, x, ids, a, bt, offsets, scales)
        ids[1] = 1
        offsets[1] = 9  # [0, 9, 8]: not in order
        with pytest.raises(ValueError, match="do not cut 8 rank rows"):
            lora_multi(base, x, ids, a, bt, offsets, scales)
        offsets[1] = 4
        lora_multi(base, x, ids, a, bt, offsets, scales)
        a.data = torch.randn(8, 16)
        got = lora_multi(base, x, ids, a, bt, offsets, scales)
    torch.testing.assert_close(got, lora_multi_ref(base, x, ids, a, b, offsets, scales), **tol("lora"))
