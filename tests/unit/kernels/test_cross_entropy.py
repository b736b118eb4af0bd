"""chunked_cross_entropy (Triton, interpreted) vs its twin, and the twin vs F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

from qlora_kit.kernels import chunked_cross_entropy
from tests.tolerances import tol

pytestmark = pytest.mark.unit
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (tokens, hidden, vocab, chunk_size)
SHAPES = {"tiny": (4, 16, 32, 2), "irregular": (37, 24, 1000, 16)}


def _inputs(t, h, v, dtype):
    hidden = torch.randn(t, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (t,))
    labels[::3] = -100
    return hidden, weight, labels


def _fwd_bwd(hidden, weight, labels, chunk, backend, reduction="mean"):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk, reduction=reduction, backend=backend)
    (loss * 2.0).backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_matches_twin(shape, dtype):
    t, h, v, chunk = shape
    args = _inputs(t, h, v, dtype)
    for name, a, r in zip(("loss", "dh", "dw"), _fwd_bwd(*args, chunk, "triton"), _fwd_bwd(*args, chunk, "torch")):
        torch.testing.assert_close(a.float(), r.float(), **tol("cross_entropy", dtype), msg=name)


@pytest.mark.parametrize(
    "shape,reduction",
    [((37, 24, 1000, 16), "mean"), ((37, 24, 1000, 16), "sum"), ((32, 4096, 32000, 16), "mean")],
    ids=["irregular-mean", "irregular-sum", "llama7b-mean"],
)
def test_twin_matches_full_logits(shape, reduction):
    t, h, v, chunk = shape
    hidden, weight, labels = _inputs(t, h, v, torch.float32)
    if h == 4096:  # llama shape: the head is frozen in QLoRA, so check only grad_hidden there
        weight.requires_grad_(False)
    ref_h = hidden.clone().requires_grad_()
    ref_w = weight.clone().requires_grad_(weight.requires_grad)
    ref = F.cross_entropy(ref_h @ ref_w.t(), labels, ignore_index=-100, reduction=reduction)
    (ref * 2.0).backward()
    hid = hidden.clone().requires_grad_()
    loss = chunked_cross_entropy(hid, weight, labels, chunk_size=chunk, reduction=reduction, backend="torch")
    (loss * 2.0).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hid.grad, ref_h.grad, rtol=1e-4, atol=1e-6)


def test_all_ignored_gives_zero_loss():
    hidden, weight, labels = _inputs(5, 8, 16, torch.float32)
    labels[:] = -100
    for backend in ("torch", "triton"):
        loss, dh, dw = _fwd_bwd(hidden, weight, labels, 2, backend)
        assert loss.item() == 0.0 and dh.abs().max().item() == 0.0 and dw.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad, message", [
    (dict(label=16), r"labels outside \[0, 16\) that are not ignore_index=-100"),
    (dict(weight_dtype=torch.bfloat16), "hidden torch.float32 and head torch.bfloat16 must be one of"),
    (dict(labels_shape=(4,)), r"hidden \(5, 8\), head \(16, 8\) and labels \(4,\) do not fit"),
    (dict(reduction="none"), "reduction='none'; use 'mean' or 'sum'"),
    (dict(chunk_size=0), "chunk_size=0 must be >= 1"),
])
def test_bad_input_gives_the_same_error_on_every_backend(backend, bad, message):
    hidden, weight, labels = _inputs(5, 8, 16, torch.float32)
    if "label" in bad:
        labels[0] = bad["label"]
    weight = weight.to(bad.get("weight_dtype", weight.dtype))
    labels = labels[: bad.get("labels_shape", labels.shape)[0]]
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=bad.get("chunk_size", 2),
                              reduction=bad.get("reduction", "mean"), backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES.values()) + [(9, 32, 20000, 4)], ids=list(SHAPES) + ["vocab_slices"])
def test_cpu_path_matches_twin(shape, dtype):
    # backend="torch" on CPU runs kernels/cpu/cross_entropy.py (in-place softmax, 16-bit head read by linear16,
    # grad_h over vocab slices); the twin is kernels/ref/cross_entropy.py
    from qlora_kit.kernels.ref import chunked_cross_entropy_ref

    t, h, v, chunk = shape
    hidden, weight, labels = _inputs(t, h, v, dtype)
    got = _fwd_bwd(hidden, weight, labels, chunk, "torch", reduction="sum")
    hr, wr = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = chunked_cross_entropy_ref(hr, wr, labels, chunk_size=chunk, reduction="sum")
    (loss * 2.0).backward()
    for name, a, r in zip(("loss", "dh", "dw"), got, (loss, hr.grad, wr.grad)):
        assert a.dtype == r.dtype, name
        torch.testing.assert_close(a.float(), r.float(), **tol("cross_entropy", dtype), msg=name)
