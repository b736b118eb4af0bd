"""Tiny random checkpoints written with transformers' own classes (test oracle), one per variant."""
from pathlib import Path

import torch

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_bias_untied": ("LlamaConfig", "LlamaForCausalLM",
                          dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "linear_rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}


def write_tiny(variant: str, out: Path, dtype=torch.float32) -> Path:
    """Save a randomly initialised transformers model of `variant` to `out`; returns `out`."""
    import transformers

    cfg_cls, model_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).to(dtype)
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: randomise them too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def load_hf(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
