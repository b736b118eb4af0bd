"""A tiny random Llama plus PEFT adapters with non-zero B, for runner/engine tests (no tokenizer needed)."""
from pathlib import Path

import torch

from qlora_kit.formats import LoraConfig
from qlora_kit.models import TokenizerError, add_adapter, adapter_params, load_model, remove_adapter, save_peft_adapter
from tests.unit.models._tiny import write_tiny


class CharTokenizer:
    """Stand-in tokenizer: token t decodes to chr(65 + t % 26); no stop ids."""

    stop_token_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + t % 26) for t in ids)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 128 for c in text]

    def encode_chat(self, messages, add_generation_prompt=True):
        raise TokenizerError("this tokenizer has no chat template")


def tiny_model(root: Path, variant: str = "llama"):
    folder = write_tiny(variant, root / variant)
    return folder, load_model(folder, compute_dtype=torch.float32)


def make_adapter(model, folder: Path, rank: int, seed: int, targets=("q_proj", "v_proj", "down_proj")) -> Path:
    """Save a PEFT adapter with random non-zero B; leaves the model without it."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=tuple(targets),
                     base_model_name_or_path=model.cfg.model_type)
    add_adapter(model, 99, cfg)
    with torch.no_grad():
        for name, p in adapter_params(model, 99).items():
            if ".lora_b." in name:
                p.copy_(0.2 * torch.randn_like(p))
    save_peft_adapter(model, 99, folder, cfg)
    remove_adapter(model, 99)
    return folder
