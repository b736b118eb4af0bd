"""formats/_targets.py against PEFT's own check_target_module_exists (the oracle), name by name: regex and list
target_modules, exclude_modules, layers_to_transform with and without layers_pattern, nested numbered parts."""
import pytest
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from qlora_kit.formats._pattern import PatternError
from qlora_kit.formats._targets import Targets

pytestmark = pytest.mark.unit

NAMES = [f"model.layers.{i}.{m}" for i in (0, 1, 2, 10, 11) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")]
NAMES += ["model.layers.1.mlp.experts.0.up_proj", "model.layers.3.mlp.experts.12.down_proj", "lm_head",
          "model.embed_tokens", "model.layers.2.self_attn", "transformer.h.4.attn.q_proj", "blocks.5.q_proj",
          "model.layers.1.self_attn.q_proj_extra", "q_proj"]
CONFIGS = [
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=r"model\.layers\.1\d?\..*proj", exclude_modules=r".*\.mlp\..*"),
    dict(target_modules=r"(.*\.)?q_proj|lm_head"),
    dict(target_modules=r".*(attn|mlp)\.\w+_proj", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "up_proj"], exclude_modules=r"model\.layers\.(0|10)\..*"),
    dict(target_modules=["q_proj", "self_attn.v_proj", "up_proj", "down_proj"], layers_to_transform=[1, 3, 10]),
    dict(target_modules=["q_proj", "up_proj", "down_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 4, 5], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[4, 5], layers_pattern=["h", "blocks"]),
    dict(target_modules=["q_proj", "up_proj", "down_proj"], layers_to_transform=[0, 12], layers_pattern="experts"),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=r"lay\w+"),
]


def _ours(cfg: dict) -> Targets:
    tm, ex = cfg["target_modules"], cfg.get("exclude_modules", ())
    layers = cfg.get("layers_to_transform", ())
    pattern = cfg.get("layers_pattern", ())
    return Targets(tm if isinstance(tm, str) else tuple(tm), ex if isinstance(ex, str) else tuple(ex),
                   (layers,) if isinstance(layers, int) else tuple(layers),
                   (pattern,) if isinstance(pattern, str) else tuple(pattern))


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_selects_like_peft(cfg):
    theirs = PeftLoraConfig(**cfg)
    ours = _ours(cfg)
    picked = set()
    for name in NAMES:
        expected = bool(check_target_module_exists(theirs, name))
        assert ours.selects(name) == expected, (cfg, name)
        picked |= {name} if expected else set()
    assert picked and picked != set(NAMES)  # each config selects some names and not others


def test_bad_patterns_are_refused_by_field():
    with pytest.raises(PatternError, match=r"target_modules '\(q': an unclosed '\('"):
        Targets("(q")
    with pytest.raises(PatternError) as e:
        Targets(("q_proj",), r"a\1")
    assert str(e.value) == "exclude_modules 'a\\\\1': the escape \\1 at character 3"
