"""The decoder's configuration, parsed from a Hugging Face config.json.

One `ModelConfig` describes every supported variant of the Llama-family decoder:

    llama    (incl. rope_type "llama3" and "linear")   attention_bias / mlp_bias flags
    mistral  (optional sliding_window)
    qwen2    q/k/v projections carry a bias
    qwen3    RMSNorm over head_dim on q and k before RoPE

RoPE settings are read from the newer `rope_parameters` dict or the older top-level `rope_theta`
plus `rope_scaling` dict; both spell the same thing.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.formats.io import read_json_object

from .errors import ConfigError, UnsupportedArchitecture

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters: theta, and optional linear or llama3 frequency scaling."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitecture(
                f"rope_type={self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.theta <= 0:
            raise ConfigError(f"rope_theta={self.theta}: must be > 0")
        if self.factor <= 0:
            raise ConfigError(f"rope factor={self.factor}: must be > 0")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"llama3 rope: high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and variant flags of one decoder (names follow STYLE.md: num_heads, num_kv_heads, head_dim)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitecture(f"unsupported architecture {self.model_type!r}; "
                                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1 (config.json)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads} (config.json)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: must be even for rotary embeddings")
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedArchitecture(f"hidden_act={self.hidden_act!r} is not supported; supported: silu")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window={self.sliding_window}: must be >= 1 or null")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_from_hf(cfg: dict) -> RopeConfig:
    """RoPE from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    kwargs = {"theta": float(theta), "rope_type": rope_type}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key in merged:
            kwargs[key] = float(merged[key])
    if "original_max_position_embeddings" in merged:
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


def config_from_hf(cfg: dict) -> ModelConfig:
    """Build a ModelConfig from the dict of a Hugging Face config.json.

    Raises:
        UnsupportedArchitecture: model_type outside SUPPORTED_MODEL_TYPES, or an unknown rope_type.
        ValueError: inconsistent shapes.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json: must be a JSON object, not {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = model_type or ",".join(cfg.get("architectures") or []) or "<missing model_type>"
        raise UnsupportedArchitecture(f"unsupported architecture {arch!r} (config.json model_type); "
                                      f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ConfigError(f"config.json: quantization_config={qc!r:.60} must be an object")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"config.json: missing {missing} (needed by the {model_type} decoder)")
    try:
        return _config(cfg, model_type)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.json: a field has the wrong type or value ({type(e).__name__}: {e})") from None


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _config(cfg: dict, model_type: str) -> ModelConfig:
    num_heads = cfg["num_attention_heads"]
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ConfigError(f"num_attention_heads={num_heads!r}: must be an integer >= 1 (config.json)")
    hidden = cfg["hidden_size"]
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ConfigError(f"hidden_size={hidden!r}: must be an integer >= 1 (config.json)")
    head_dim = cfg.get("head_dim") or hidden // num_heads
    attention_bias = bool(cfg.get("attention_bias", False))
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise UnsupportedArchitecture(f"{model_type} with use_sliding_window=true is not supported (config.json)")
    sliding = cfg.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        hidden_act=cfg.get("hidden_act", "silu"),
    )


def load_config(folder: str | os.PathLike) -> ModelConfig:
    """Read `folder/config.json` into a ModelConfig (see config_from_hf)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UnsupportedArchitecture(f"{path}: missing; not a Hugging Face model folder")
    data = read_json_object(path, ConfigError)
    try:
        return config_from_hf(data)
    except (ConfigError, UnsupportedArchitecture) as e:
        raise type(e)(f"{path}: {str(e).removeprefix('config.json: ')}") from None
