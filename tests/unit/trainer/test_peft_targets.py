"""qtrain with PEFT's target spelling: a regex target_modules, exclude_modules, layers_to_transform and --use-rslora
train onto the modules PEFT selects for the same config, and the written adapter_config.json says so (PEFT reads it
back onto the same modules)."""
import json

import pytest
import torch
from click.testing import CliRunner

from qlora_kit.formats import load_adapter, lora_pairs
from qlora_kit.trainer.cli import main

pytestmark = pytest.mark.unit


def _peft_modules(base, adapter) -> set[str]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {name for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("setting, flags, expected", [
    ('target_modules = ".*\\\\.(q|v)_proj"\nexclude_modules = "model\\\\.layers\\\\.0\\\\.self_attn\\\\.v_proj"\n',
     ["--use-rslora"], {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                        "model.layers.1.self_attn.v_proj"}),
    ("", ["--target-modules", "o_proj,down_proj", "--layers-to-transform", "1", "--exclude-modules", "down_proj"],
     {"model.layers.1.self_attn.o_proj"}),
])
def test_peft_style_targets_train_and_read_back_in_peft(tiny_chat, chat_data, tmp_path, setting, flags, expected):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'base = "{tiny_chat}"\ndata = "{chat_data}"\nr = 4\nmax_steps = 1\nbatch_size = 2\n'
                   f'grad_accum = 1\ncompute_dtype = "float32"\nmax_seq_len = 128\n{setting}')
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--no-progress", *flags])
    assert res.exit_code == 0, res.output
    config, tensors = load_adapter(out)
    assert set(lora_pairs(tensors)) == expected == _peft_modules(tiny_chat, out)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["use_rslora"] is ("--use-rslora" in flags)
    if "--use-rslora" in flags:
        assert raw["target_modules"] == r".*\.(q|v)_proj" and config.scale() == raw["lora_alpha"] / 2


def test_help_lists_the_peft_options():
    out = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    for text in ("--use-rslora", "--exclude-modules", "--layers-to-transform", "--layers-pattern", "--data-split",
                 "regular expression", "Hub dataset id"):
        assert text in out, text
