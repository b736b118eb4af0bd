"""The codec and layout on real weights: every linear weight of the bundled SmolLM2."""
import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_kit.formats import decode_absmax, dequantize_4bit, from_entries, load_safetensors, quantize_4bit, should_quantize
from qlora_kit.formats import quantized_weight_names, sqnr_db
from qlora_kit.kernels import dequant
from tests.tolerances import tol

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(smollm2):
    return load_safetensors(smollm2 / "model.safetensors")


def test_every_linear_weight_is_bit_exact_and_has_bitsandbytes_sqnr(weights):
    rows = []
    linear = {k: v for k, v in weights.items() if should_quantize(k, v)}
    assert len(linear) == 30 * 7
    for name, w in linear.items():
        ours = quantize_4bit(w, "nf4", 64, double_quant=True, name=name)
        q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(ours.data, q), name
        assert torch.equal(ours.state.nested.absmax, st.state2.absmax), name
        their_absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset
        step = st.state2.absmax.repeat_interleave(256)[: their_absmax.numel()] * tol("dq_absmax_vs_bnb")["atol"]
        assert torch.all((decode_absmax(ours.state) - their_absmax).abs() <= step + 1e-7), name
        ours_db = sqnr_db(w, dequant(ours, torch.float32))
        theirs_db = sqnr_db(w, bnbf.dequantize_4bit(q, st).float())
        assert ours_db == pytest.approx(theirs_db, abs=tol("sqnr_db")["atol"]), name
        rows.append((name, ours_db, theirs_db))
    print("\nper-tensor SQNR (dB), ours vs bitsandbytes, 5 worst:")
    for name, a, b in sorted(rows, key=lambda r: r[1])[:5]:
        print(f"  {name:45s} {a:7.3f} {b:7.3f}")
    mean = sum(r[1] for r in rows) / len(rows)
    print(f"  mean over {len(rows)} tensors: {mean:.3f} dB")


def test_transformers_bitsandbytes_checkpoint_reads_with_our_code(smollm2_bnb_nf4, weights):
    from transformers import AutoModelForCausalLM

    tensors = load_safetensors(smollm2_bnb_nf4 / "model.safetensors")
    names = quantized_weight_names(tensors)
    assert len(names) == 210
    model = AutoModelForCausalLM.from_pretrained(smollm2_bnb_nf4, device_map="cpu")
    params = dict(model.named_parameters())
    for name in names:
        packed = from_entries(name, tensors)
        assert packed.state.shape == tuple(weights[name].shape) and packed.state.dtype == torch.bfloat16
        param = params[name]
        theirs = bnbf.dequantize_4bit(param.data, param.quant_state)
        assert torch.equal(dequantize_4bit(packed), theirs), name
        assert torch.equal(packed.data, quantize_4bit(weights[name], "nf4", 64, True).data), name
