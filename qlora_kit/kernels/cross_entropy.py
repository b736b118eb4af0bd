"""Chunked cross-entropy over an LM head without materializing the [tokens, vocab] logits.

For a chunk of C tokens: z = h_c W^T (C, V) in the input dtype (a tensor-core matmul), then the
Triton kernel computes per row, in fp32,
    lse = log sum_v exp(z_v),   loss_t = lse - z_{y_t}   (0 where y_t = ignore_index),
and overwrites z in place with d loss / d z = (softmax(z) - onehot(y_t)) / denom. The chunk's
gradients dh_c = dz W and dW += dz^T h_c are taken in the same pass, so backward only scales them.
"""
import torch

from ._checks import check_cross_entropy
from ._dispatch import use_triton
from ._triton import tl, triton
from .cpu.cross_entropy import ChunkedCrossEntropyCPU
from .ref.cross_entropy import _ChunkedCrossEntropyRef, _needs_grad, chunked_cross_entropy_ref


@triton.jit
def _cross_entropy_kernel(
    z_ptr,  # (C, V) chunk logits, row stride V; overwritten with d loss / d z when WRITE_GRAD
    labels_ptr,  # (C,) int64 targets
    loss_ptr,  # (C,) fp32 per-token loss
    V,
    ignore_index,
    inv_denom,  # 1 / number of non-ignored tokens ("mean") or 1 ("sum")
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    # Program p owns row p: one online max/sum-exp sweep over V, then (for the gradient) a second sweep.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * V
    label = tl.load(labels_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)
    acc = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        col = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + col, mask=col < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    target = tl.load(z_row + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, inv_denom, 0.0)
        for start in range(0, V, BLOCK_V):
            col = start + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + col, mask=col < V, other=0.0).to(tl.float32)
            d = (tl.exp(z - lse) - tl.where(col == safe_label, 1.0, 0.0)) * scale
            tl.store(z_row + col, d.to(z_ptr.dtype.element_ty), mask=col < V)


def _config(vocab: int) -> dict:
    """One row per program, swept in chunks of at most 4096 logits."""
    return {"BLOCK_V": min(triton.next_power_of_2(vocab), 4096), "num_warps": 8}


class _ChunkedCrossEntropy(_ChunkedCrossEntropyRef):
    """The twin's Function with the Triton forward; backward (scaling the gradients taken in forward) is the twin's."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction, need_h, need_w):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).contiguous()
        valid = int((y != ignore_index).sum())
        inv_denom = 1.0 / max(valid, 1) if reduction == "mean" else 1.0
        grad_h = torch.empty_like(h) if need_h else None
        # fp32 accumulator only when the head itself is trained; QLoRA keeps it frozen
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        cfg = _config(weight.shape[0])
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size]
            z = hc @ weight.t()  # (c, V) in the input dtype; the only chunk-sized buffer
            _cross_entropy_kernel[(hc.shape[0],)](
                z, y[start:start + chunk_size], losses[start:start + chunk_size], weight.shape[0], ignore_index,
                inv_denom, WRITE_GRAD=need_h or need_w, **cfg,
            )
            if need_h:
                torch.mm(z, weight, out=grad_h[start:start + chunk_size])
            if need_w:
                grad_w.addmm_(z.t().float(), hc.float()) if z.dtype != torch.float32 else grad_w.addmm_(z.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return losses.sum() * inv_denom


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int = 1024, reduction: str = "mean",
                          backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of the LM head's logits, `chunk_size` tokens at a time; differentiable in hidden and weight.

    Args:
        hidden: (..., H) final hidden states (already shifted against labels), bf16, fp16 or fp32.
        lm_head_weight: (V, H) in hidden's dtype and device. Its gradient is computed only if it requires grad.
        labels: (...) int64 token ids matching hidden's leading shape; ignore_index marks masked tokens.
        ignore_index: label value that contributes neither loss nor gradient.
        chunk_size: tokens per chunk; peak extra memory is chunk_size * V logits.
        reduction: "mean" over non-ignored tokens (0 when there are none) or "sum".
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py).

    Returns:
        Scalar fp32 loss.

    Raises:
        ValueError on mismatched shapes, dtypes or devices, labels out of range, a bad chunk_size or reduction.
    """
    check_cross_entropy(hidden, lm_head_weight, labels, ignore_index, chunk_size, reduction)
    if not use_triton(hidden, backend):
        if hidden.device.type != "cpu":  # the torch path on an accelerator: the twin
            return chunked_cross_entropy_ref(hidden, lm_head_weight, labels, ignore_index, chunk_size, reduction)
        # the CPU path: the twin's math, lean in memory (kernels/cpu/cross_entropy.py)
        return ChunkedCrossEntropyCPU.apply(hidden, lm_head_weight, labels.long(), ignore_index, chunk_size, reduction,
                                            *_needs_grad(hidden, lm_head_weight))
    return _ChunkedCrossEntropy.apply(hidden, lm_head_weight, labels.long(), ignore_index, chunk_size, reduction,
                                      *_needs_grad(hidden, lm_head_weight))
