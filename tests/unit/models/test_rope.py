"""Our RoPE frequencies and rotation against transformers' (the oracle)."""
import pytest
import torch

from qlora_kit.models import RopeConfig
from qlora_kit.models.rope import apply_rope, inv_frequencies, rope_cos_sin

pytestmark = pytest.mark.unit

CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("name", list(CASES))
def test_inv_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = CASES[name]
    hf_cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=dict(params))
    if name == "default":
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[name](hf_cfg, "cpu")
    ours = inv_frequencies(RopeConfig(
        theta=params["rope_theta"], rope_type=name, factor=params.get("factor", 1.0),
        low_freq_factor=params.get("low_freq_factor", 1.0), high_freq_factor=params.get("high_freq_factor", 4.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings", 8192)), 128)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_rotation_preserves_norm_and_is_relative():
    """RoPE is a rotation: norms are kept and q.k depends only on the position difference."""
    f = inv_frequencies(RopeConfig(), 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(x, p):
        cos, sin = rope_cos_sin(f, torch.tensor([[p]]), torch.float32)
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    torch.testing.assert_close((at(q, 9) * at(k, 4)).sum(), (at(q, 105) * at(k, 100)).sum(), rtol=1e-4, atol=1e-4)
