"""Regenerate FORMAT.md §7's worked example from the code: python -m tests.unit.formats.worked_example"""
import json

import torch

from qlora_kit.formats import decode_absmax, dequantize_4bit, quantize_4bit
from qlora_kit.formats.layout import encode_state_json


def worked_example_weight() -> torch.Tensor:
    j = torch.arange(64, dtype=torch.float32)
    return torch.stack([(j - 32) / 32, (31 - j) / 64]).to(torch.bfloat16)


def worked_example() -> dict:
    w = worked_example_weight()
    packed = quantize_4bit(w, "nf4", 64, double_quant=True)
    plain = quantize_4bit(w, "nf4", 64, double_quant=False)
    flat = packed.data.flatten()
    codes = torch.stack([flat >> 4, flat & 0xF], 1).flatten().tolist()
    return {
        "input": "W[0,j] = (j-32)/32, W[1,j] = (31-j)/64, j = 0..63, bfloat16, shape [2, 64]",
        "quant_type": "nf4",
        "blocksize": 64,
        "codes_row0": codes[:64],
        "codes_row1": codes[64:],
        "weight_hex": bytes(flat.tolist()).hex(),
        "weight_shape": list(packed.data.shape),
        "absmax_fp32_before_double_quant": plain.state.absmax.tolist(),
        "absmax_u8": packed.state.absmax.tolist(),
        "nested_absmax": packed.state.nested.absmax.tolist(),
        "nested_offset": packed.state.nested.offset.item(),
        "decoded_absmax": decode_absmax(packed.state).tolist(),
        "dequantized_row0_first8": dequantize_4bit(packed)[0, :8].float().tolist(),
        "quant_state_json": encode_state_json(packed.state).decode(),
    }


def render(example: dict) -> str:
    """The JSON block as FORMAT.md prints it: one key per line, lists on one line."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in example.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


if __name__ == "__main__":
    print(render(worked_example()))
