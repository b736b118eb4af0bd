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
    yml.write_text("base: m\ndata: d.jsonl\nout: o\ntarget_modules: q_proj,k_proj\npacking: false\n")
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
