"""A tiny random Llama checkpoint folder for qconvert's fast tests (2 layers, hidden 64).

Shapes: embed/lm_head (vocab 96, 64); q/o (64, 64); k/v (32, 64); gate/up (160, 64); down (64, 160)
(160 * 64 = 10240 elements = 160 blocks of 64; k/v = 2048). One weight has an odd element count in
`odd=True` mode to exercise the padded last byte.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 96,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "max_position_embeddings": 128,
    "bos_token_id": 1, "eos_token_id": 2,
}


def tiny_state(dtype=torch.bfloat16, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    state = {"model.embed_tokens.weight": w(96, 64), "lm_head.weight": w(96, 64), "model.norm.weight": w(64) + 1}
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {p + "self_attn.q_proj.weight": w(64, 64), p + "self_attn.k_proj.weight": w(32, 64),
                  p + "self_attn.v_proj.weight": w(32, 64), p + "self_attn.o_proj.weight": w(64, 64),
                  p + "mlp.gate_proj.weight": w(160, 64), p + "mlp.up_proj.weight": w(160, 64),
                  p + "mlp.down_proj.weight": w(64, 160), p + "input_layernorm.weight": w(64) + 1,
                  p + "post_attention_layernorm.weight": w(64) + 1}
    return state


def write_tiny(folder: Path, state: dict | None = None, config: dict | None = None, bin_format: bool = False) -> Path:
    """Write config, generation config, chat template, tokenizer config and weights into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_state() if state is None else state
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "README.md").write_text("source card, not copied")
    if bin_format:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
