"""The one Llama-family decoder (llama, mistral, qwen2, qwen3): variants are ModelConfig flags.

    h_0 = E[ids]
    h'  = h + o_proj(Attn(RoPE(q_norm?(q_proj(n1(h)))), RoPE(k_norm?(k_proj(n1(h)))), v_proj(n1(h))))
    h   = h' + down_proj(silu(gate_proj(n2(h'))) * up_proj(n2(h')))
    logits = lm_head(norm(h_L))          (lm_head = E when embeddings are tied)

RMSNorm(x) = w * (x / sqrt(mean(x^2) + eps)), computed in fp32, cast back before the weight.
RMSNorm, RoPE and SwiGLU run kernels/ (Triton on CUDA; on CPU their twins, which round as written here).
Module paths equal Hugging Face's (model.layers.N.self_attn.q_proj ...), so checkpoint and PEFT
adapter names map one to one. Every projection is a LoraLinear over a frozen base (NF4Linear when
quantized, nn.Linear otherwise); the projections that share an input (q/k/v, gate/up) run through
lora.forward_group, which serves a mixed batch's LoRA terms of the group in one kernel call.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_kit import kernels
from qlora_kit.kernels.cpu import linear16, matmul_dtype

from .attention import AttentionMeta, attend, build_meta
from .batch import Batch
from .config import ModelConfig
from .lora import LoraLinear, forward_group
from .nf4_linear import NF4Linear, dense_linear
from .rope import apply_rope, inv_frequencies, rope_cos_sin

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) over the last dim, statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x, self.weight, self.eps)


def _projection(in_features: int, out_features: int, bias: bool, quantized: bool, backend) -> LoraLinear:
    base = NF4Linear(in_features, out_features, bias, backend) if quantized else dense_linear(in_features, out_features, bias)
    return LoraLinear(base, in_features, out_features)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quantized: bool, backend):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h = cfg.hidden_size
        self.q_proj = _projection(h, cfg.q_size, cfg.qkv_bias, quantized, backend)
        self.k_proj = _projection(h, cfg.kv_size, cfg.qkv_bias, quantized, backend)
        self.v_proj = _projection(h, cfg.kv_size, cfg.qkv_bias, quantized, backend)
        self.o_proj = _projection(cfg.q_size, h, cfg.o_bias, quantized, backend)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta: AttentionMeta, adapter_ids, cache) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = forward_group((self.q_proj, self.k_proj, self.v_proj), x, adapter_ids)
        q = q.view(B, T, c.num_heads, c.head_dim)
        k = k.view(B, T, c.num_kv_heads, c.head_dim)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, meta)
        o = attend(q, k, v, meta).transpose(1, 2).reshape(B, T, c.q_size)
        return self.o_proj(o, adapter_ids)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quantized: bool, backend):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _projection(h, i, cfg.mlp_bias, quantized, backend)
        self.up_proj = _projection(h, i, cfg.mlp_bias, quantized, backend)
        self.down_proj = _projection(i, h, cfg.mlp_bias, quantized, backend)

    def forward(self, x, adapter_ids) -> torch.Tensor:
        gate, up = forward_group((self.gate_proj, self.up_proj), x, adapter_ids)
        return self.down_proj(kernels.swiglu(gate, up), adapter_ids)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quantized: bool, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, quantized, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, quantized, backend)

    def forward(self, h, cos, sin, meta, adapter_ids, cache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, adapter_ids, cache)
        return h + self.mlp(self.post_attention_layernorm(h), adapter_ids)


class Backbone(nn.Module):
    """Embeddings, decoder layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, quantized: bool, backend):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, quantized, backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """The decoder with its LM head.

    Args:
        cfg: shapes and variant flags.
        quantized: projections are NF4Linear (weights set by the loader) instead of nn.Linear.
        backend: kernel backend for NF4Linear (None = dispatch by device).
    """

    def __init__(self, cfg: ModelConfig, quantized: bool = False, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, quantized, backend)
        self.lm_head = None
        self._sharing = False  # the NF4 layers' share_decode, as hidden_states last set it
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
        self.init_rope()

    def init_rope(self, device=None) -> None:
        """(Re)compute the RoPE frequencies, e.g. after meta-device construction."""
        self.register_buffer("inv_freq", inv_frequencies(self.cfg.rope, self.cfg.head_dim, device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def lora_layers(self) -> dict[str, LoraLinear]:
        """Every LoRA-capable projection by its Hugging Face module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LoraLinear)}

    def share_decode(self, enabled: bool = True) -> None:
        """Under gradient checkpointing: each NF4 layer's recompute keeps its decoded weight for the backward
        that follows, so the two share one decode (only the layer being back-propagated holds one)."""
        self._sharing = enabled
        for m in self.modules():
            if isinstance(m, NF4Linear):
                m.share_decode = enabled

    def hidden_states(self, batch: Batch, checkpointing: bool = False) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden_size) for `batch`.

        With `checkpointing` (training), each decoder layer keeps only its input and recomputes its
        activations in backward (non-reentrant torch.utils.checkpoint, which also replays the RNG so LoRA
        dropout masks match), and `share_decode` is on: non-reentrant checkpointing drops what the first
        forward saves, so only the recompute keeps a decoded 4-bit weight, for the backward that follows.
        """
        if checkpointing != self._sharing:
            self.share_decode(checkpointing)
        cache = batch.cache
        meta = cache.prepare(batch, self.cfg.sliding_window) if cache is not None else build_meta(batch, self.cfg.sliding_window)
        h = self.model.embed_tokens(batch.input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, meta.positions, h.dtype)
        for layer in self.model.layers:
            if checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, meta, batch.adapter_ids, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, meta, batch.adapter_ids, cache)
        return self.model.norm(h)

    def head_weight(self) -> torch.Tensor:
        """The LM head's (vocab_size, hidden_size) weight: the embeddings when they are tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head over hidden states (..., hidden_size) -> (..., vocab_size) in the compute dtype."""
        w = self.head_weight()
        if h.device.type == "cpu" and matmul_dtype(h.dtype) != h.dtype:
            # no native 16-bit GEMM on this CPU: the same products in fp32 (16-bit values are exact in fp32, the sum
            # is fp32 either way), rounded once to the compute dtype; several times faster than the emulated GEMM
            return linear16(h, w).to(h.dtype)
        return F.linear(h, w.to(h.dtype))

    def forward(self, batch: Batch, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size), or (B, 1, vocab_size) for the last position with `last_only`."""
        h = self.hidden_states(batch)
        return self.logits(h[:, -1:] if last_only else h)
