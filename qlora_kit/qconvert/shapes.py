"""The shapes a Llama-family config.json implies, checked at convert time so a checkpoint that qtrain or
qserve could never load is refused before anything is written.

With H = hidden_size, I = intermediate_size, V = vocab_size, n = num_attention_heads, k = num_key_value_heads
(default n) and d = head_dim (default H / n), every layer i < num_hidden_layers holds

    self_attn.q_proj.weight (n*d, H)   self_attn.k_proj.weight (k*d, H)   self_attn.v_proj.weight (k*d, H)
    self_attn.o_proj.weight (H, n*d)   mlp.gate_proj.weight (I, H)   mlp.up_proj.weight (I, H)   mlp.down_proj.weight (H, I)

and embed_tokens.weight / lm_head.weight are (V, H).
"""
import re
from pathlib import Path

from qlora_kit.formats import FormatError

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _positive(config: dict, key: str, path: Path, required: bool = True) -> int | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        got = "missing" if key not in config else f"{value!r:.60}"
        raise FormatError(f"{path}: {key} is {got}; must be an integer >= 1")
    return value


def check_shapes_config(config: dict, path: Path) -> None:
    """The config fields the shapes depend on: present, integers >= 1, heads consistent. FormatError otherwise."""
    for key in REQUIRED:
        _positive(config, key, path)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = _positive(config, "num_key_value_heads", path, required=False) or heads
    if heads % kv:
        raise FormatError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if _positive(config, "head_dim", path, required=False) is None and hidden % heads:
        raise FormatError(f"{path}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                          "(and there is no head_dim)")


def expected_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Weight-name suffix -> (out, in) for a config that passed check_shapes_config."""
    h, i, v, n = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads"))
    k = config.get("num_key_value_heads") or n
    d = config.get("head_dim") or h // n
    return {"self_attn.q_proj.weight": (n * d, h), "self_attn.k_proj.weight": (k * d, h),
            "self_attn.v_proj.weight": (k * d, h), "self_attn.o_proj.weight": (h, n * d),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
            "embed_tokens.weight": (v, h), "lm_head.weight": (v, h)}


def check_tensor_shapes(config: dict, infos, path: Path) -> None:
    """Every projection, embedding and head of `infos` (source TensorInfos) has its config shape, and every
    layer index is below num_hidden_layers. Raises FormatError naming the tensor and the config fields."""
    shapes = expected_shapes(config)
    layers = config["num_hidden_layers"]
    for info in infos:
        m = _LAYER.search(info.name)
        if m and int(m.group(1)) >= layers:
            raise FormatError(f"{info.file}: tensor {info.name}: layer {m.group(1)} but {path} has "
                              f"num_hidden_layers={layers}")
        for suffix, want in shapes.items():
            if info.name == suffix or info.name.endswith("." + suffix):
                if tuple(info.shape) != want:
                    raise FormatError(f"{info.file}: tensor {info.name}: shape {list(info.shape)} but {path} "
                                      f"implies {list(want)} (hidden_size, intermediate_size, vocab_size, heads)")
                break
