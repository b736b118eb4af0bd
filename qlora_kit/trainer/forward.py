"""The training forward pass: decoder layers (each optionally checkpointed) and the chunked LM-head loss.

This mirrors models.Llama.hidden_states layer for layer; it lives here only until models/ offers a
checkpointing switch (requested in issue 8's report). With checkpointing, each layer keeps just its
input and recomputes its activations in backward (non-reentrant torch.utils.checkpoint, which also
replays the RNG so LoRA dropout masks match). The loss is kernels.chunked_cross_entropy summed over
loss tokens: the [tokens, vocab] logits are never materialized.
"""
import torch
from torch.utils.checkpoint import checkpoint

from qlora_kit.kernels import chunked_cross_entropy
from qlora_kit.models import Llama, build_meta
from qlora_kit.models.rope import rope_cos_sin

from .batching import StepBatch
from .data import IGNORE


def hidden_states(model: Llama, batch, checkpointing: bool) -> torch.Tensor:
    """Final-norm hidden states (B, T, hidden_size), as Llama.hidden_states without a KV cache."""
    meta = build_meta(batch, model.cfg.sliding_window)
    # non-reentrant checkpointing drops what the first forward saves, so only recompute keeps a decoded weight
    model.share_decode(checkpointing)
    h = model.model.embed_tokens(batch.input_ids)
    cos, sin = rope_cos_sin(model.inv_freq, meta.positions, h.dtype)
    for layer in model.model.layers:
        if checkpointing and torch.is_grad_enabled():
            h = checkpoint(layer, h, cos, sin, meta, batch.adapter_ids, None, use_reentrant=False)
        else:
            h = layer(h, cos, sin, meta, batch.adapter_ids, None)
    return model.model.norm(h)


def head_weight(model: Llama) -> torch.Tensor:
    return model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


def summed_loss(model: Llama, step: StepBatch, checkpointing: bool = True, chunk_size: int = 1024) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's loss tokens (fp32 scalar); divide by the token count."""
    h = hidden_states(model, step.batch, checkpointing)
    keep = step.labels != IGNORE  # only loss tokens reach the LM head
    w = head_weight(model)
    return chunked_cross_entropy(h[keep], w.to(h.dtype), step.labels[keep], IGNORE, chunk_size, reduction="sum")
