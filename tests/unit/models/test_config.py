import json

import pytest

from qlora_kit.models import ModelConfig, RopeConfig, UnsupportedArchitecture, config_from_hf, load_config

pytestmark = pytest.mark.unit

SMOL = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}


def test_smollm2_style_config():
    c = config_from_hf(SMOL)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (9, 3, 64, 30)
    assert c.tie_word_embeddings and c.rope == RopeConfig(theta=100000.0)
    assert not (c.qkv_bias or c.o_bias or c.qk_norm) and c.sliding_window is None


def test_legacy_rope_theta_and_rope_scaling_keys():
    cfg = {k: v for k, v in SMOL.items() if k != "rope_parameters"}
    cfg |= {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    rope = config_from_hf(cfg).rope
    assert (rope.theta, rope.rope_type, rope.factor) == (500000.0, "llama3", 8.0)
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert config_from_hf(cfg).rope == RopeConfig(theta=500000.0, rope_type="linear", factor=2.0)


def test_variant_flags():
    assert config_from_hf(SMOL | {"model_type": "qwen2"}).qkv_bias
    assert not config_from_hf(SMOL | {"model_type": "qwen2"}).o_bias
    q3 = config_from_hf(SMOL | {"model_type": "qwen3", "head_dim": 128})
    assert q3.qk_norm and q3.head_dim == 128 and not q3.qkv_bias
    assert config_from_hf(SMOL | {"model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    assert config_from_hf(SMOL | {"attention_bias": True}).o_bias


def test_unsupported_architecture_lists_supported(tmp_path):
    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        config_from_hf(SMOL | {"model_type": "gpt2"})
    (tmp_path / "config.json").write_text(json.dumps(SMOL | {"model_type": "mixtral"}))
    with pytest.raises(UnsupportedArchitecture, match="mixtral"):
        load_config(tmp_path)


def test_unsupported_rope_type_and_bad_shapes():
    with pytest.raises(UnsupportedArchitecture, match=r"rope_type='yarn'.*default, linear, llama3"):
        config_from_hf(SMOL | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_attention_heads=9 is not a multiple of num_key_value_heads=2"):
        config_from_hf(SMOL | {"num_key_value_heads": 2})
    with pytest.raises(ValueError, match="hidden_size=0"):
        ModelConfig("llama", 10, 0, 4, 1, 1, 1, 2)
