"""trainer/config.py: the paper preset as defaults, file and flag overrides, errors naming the key."""
from pathlib import Path

import pytest

from qlora_kit import trainer
from qlora_kit.trainer.config import TrainConfig, build_config, defaults, read_config_file
from qlora_kit.trainer.errors import ConfigError

pytestmark = pytest.mark.unit

REQUIRED = dict(base="b", data="d.jsonl", out="o")
CONFIGS = Path(trainer.__file__).parent / "configs"


def test_defaults_are_the_qlora_paper_preset():
    d = defaults()
    assert (d["r"], d["lora_alpha"], d["target_modules"], d["learning_rate"], d["lr_scheduler"]) == \
        (64, 16.0, ("all-linear",), 2e-4, "constant")
    assert (d["warmup_ratio"], d["max_grad_norm"], d["optimizer"], d["lora_dropout"]) == \
        (0.03, 0.3, "paged_adamw", 0.1)
    assert d["batch_size"] * d["grad_accum"] == 16 and d["gradient_checkpointing"]


def test_file_overrides_defaults_and_flags_override_the_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('base = "m"\ndata = "d.jsonl"\nout = "o"\nr = 8\nlearning-rate = 1\n'
                    'target_modules = ["q_proj", "v_proj"]\n')
    cfg = build_config(toml, r=16, packing=None)
    assert (cfg.r, cfg.learning_rate, cfg.target_modules, cfg.packing) == (16, 1.0, ("q_proj", "v_proj"), True)
    yml = tmp_path / "run.yaml"
    yml.write_text("base: m\ndata: d.jsonl\nout: o\ntarget_modules: [q_proj, k_proj]\npacking: false\n")
    cfg = build_config(yml)
    assert cfg.target_modules == ("q_proj", "k_proj") and cfg.packing is False


@pytest.mark.parametrize("text, suffix, message", [
    ("lora_rank = 8\n", ".toml", "run.toml: unknown key 'lora_rank'"),
    ("r = 'eight'\n", ".toml", "run.toml: r='eight': expected a int"),
    ("r = [\n", ".toml", "run.toml: "),
    ("r: [1,\n", ".yaml", "run.yaml: "),
    ("packing = 1\n", ".toml", "run.toml: packing=1: expected true or false"),
    ("r: 8\n", ".ini", "unknown config type '.ini'"),
])
def test_bad_file_names_the_file_and_key(tmp_path, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_config_file(path)
    assert message in str(e.value)


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "r=0: must be >= 1 (--r)"),
    (dict(lora_dropout=1.5), "lora_dropout=1.5: must be in [0, 1)"),
    (dict(optimizer="sgd"), "optimizer='sgd': choose one of adamw, adamw8bit, paged_adamw, paged_adamw8bit"),
    (dict(base=""), "base is required (--base or config key base)"),
    (dict(threads=-1), "threads=-1: must be >= 0 (--threads)"),
])
def test_out_of_range_values_name_the_field(kw, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{**REQUIRED, **kw})
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_every_shipped_config_loads():
    files = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".toml", ".yaml", ".yml"))
    assert files, f"no shipped configs under {CONFIGS}"
    for path in files:
        assert path.read_text().startswith("# qtrain train --config"), f"{path}: first line must be its launch command"
        read_config_file(path)


def test_threads_pins_intra_op_threads_and_zero_keeps_the_default():
    import torch

    from qlora_kit.trainer import setup

    before = torch.get_num_threads()
    try:
        setup.pin_threads(0)
        assert torch.get_num_threads() == before
        setup.pin_threads(before + 1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_peft_style_target_fields(tmp_path):
    """PEFT's LoraConfig spelling: a string target_modules / exclude_modules is a regex, a list holds names,
    layers_to_transform takes an int or a list; the CLI spelling (comma-separated strings) gives the same."""
    toml = tmp_path / "peft.toml"
    toml.write_text('base = "m"\ndata = "d.jsonl"\nout = "o"\ntarget_modules = ".*\\\\.(q|v)_proj"\n'
                    'exclude_modules = ["layers.0.self_attn.q_proj"]\nuse_rslora = true\nuse_dora = false\n'
                    'bias = "none"\nmodules_to_save = []\n')
    cfg = build_config(toml)
    assert cfg.target_modules == r".*\.(q|v)_proj" and cfg.exclude_modules == ("layers.0.self_attn.q_proj",)
    assert cfg.use_rslora and cfg.to_json()["target_modules"] == r".*\.(q|v)_proj"
    cfg = build_config(None, **REQUIRED, target_modules=("q_proj",), layers_to_transform=("0", "2"),
                       layers_pattern=("layers",))
    assert cfg.layers_to_transform == (0, 2) and cfg.layers_pattern == ("layers",)
    assert build_config(None, **REQUIRED, layers_to_transform=1).layers_to_transform == (1,)
    assert build_config(None, **REQUIRED, target_modules="all-linear").target_modules == ("all-linear",)


@pytest.mark.parametrize("extra, message", [
    ('use_dora = true\n', "use_dora=True is not supported by qlora-kit (PEFT's default False"),
    ('target_parameters = ["experts.down_proj"]\n', "target_parameters=['experts.down_proj'] is not supported"),
    ('modules_to_save = ["lm_head"]\n', "modules_to_save=['lm_head'] is not supported"),
    ('rank_pattern = {q_proj = 8}\n', "rank_pattern={'q_proj': 8} is not supported"),
    ('init_lora_weights = "pissa"\n', "init_lora_weights='pissa' is not supported"),
    ('bias = "all"\n', "bias='all' is not supported"),
    ('target_modules = "q_proj"\nlayers_to_transform = [0]\n', "cannot be combined with layers_to_transform"),
    ('layers_pattern = "layers"\n', "layers_pattern=['layers']: needs --layers-to-transform"),
    ('target_modules = "q_proj("\n', "target_modules='q_proj(': an unclosed '('"),
    ('layers_to_transform = ["a"]\n', "layers_to_transform=['a']: expected a layer index"),
])
def test_unsupported_peft_fields_are_refused_by_name(tmp_path, extra, message):
    toml = tmp_path / "peft.toml"
    toml.write_text('base = "m"\ndata = "d.jsonl"\nout = "o"\n' + extra)
    with pytest.raises(ConfigError) as e:
        build_config(toml)
    assert message in str(e.value)
