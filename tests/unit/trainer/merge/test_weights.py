"""merge/weights.py: one merged weight is one rounding of the fp32 merge, and its reported cost is that rounding."""
import pytest
import torch

from qlora_kit.formats import quantize_4bit, to_entries
from qlora_kit.kernels import dequant
from qlora_kit.trainer.merge import merge_weight

pytestmark = pytest.mark.unit
NAME = "model.layers.0.mlp.up_proj.weight"


def _pair(out=96, inp=128, r=4, std=0.05):
    w = (torch.randn(out, inp) * 0.05).to(torch.bfloat16)
    return w, torch.randn(r, inp) * 0.1, torch.randn(out, r) * std


def test_bf16_is_one_rounding_of_the_fp32_merge():
    w, a, b = _pair()
    entries, cost = merge_weight(NAME, w, a, b, 2.5, "bf16")
    exact = w.float() + (b @ a) * 2.5
    assert list(entries) == [NAME] and torch.equal(entries[NAME], exact.to(torch.bfloat16))
    err = (entries[NAME].float() - exact).norm()
    assert cost.rel_error == pytest.approx(float(err / exact.norm()), rel=1e-5)
    assert cost.update_error == pytest.approx(float(err / ((b @ a) * 2.5).norm()), rel=1e-5)
    assert 0 < cost.rel_error < 2**-8  # bf16 keeps 8 significant bits: rounding is at most half a step
    assert (cost.shape, cost.rank, cost.scale) == ((96, 128), 4, 2.5)


def test_nf4_requantizes_the_merged_weight_with_the_base_settings():
    w, a, b = _pair()
    like = quantize_4bit(w, "nf4", 128, True, NAME)
    w_deq = dequant(like, torch.bfloat16)
    entries, cost = merge_weight(NAME, w_deq, a, b, 0.5, "nf4", like)
    merged = (w_deq.float() + (b @ a) * 0.5).to(torch.bfloat16)
    expected = to_entries(NAME, quantize_4bit(merged, "nf4", 128, True, NAME))
    assert entries.keys() == expected.keys()
    assert all(torch.equal(entries[k], expected[k]) for k in expected)
    _, bf16_cost = merge_weight(NAME, w_deq, a, b, 0.5, "bf16")
    assert bf16_cost.rel_error < cost.rel_error < 0.2  # 4-bit codes cost far more than bf16 rounding


def test_an_update_below_bf16_resolution_is_reported_lost():
    w, a, b = _pair(std=1e-7)  # |s B A| far below half a bf16 step of w: the merged weight is w itself
    entries, cost = merge_weight(NAME, w, a, b, 1.0, "bf16")
    assert torch.equal(entries[NAME], w)
    # R = w + s B A is fp32: the tiny update is itself held to fp32's resolution around w (~2^-24 |w|), ~0.2% here
    assert cost.update_error == pytest.approx(1.0, abs=1e-2)


def test_zero_update_has_no_update_error():
    w, a, _ = _pair()
    entries, cost = merge_weight(NAME, w, a, torch.zeros(96, 4), 2.0, "bf16")
    assert torch.equal(entries[NAME], w) and cost.rel_error == 0.0 and cost.update_error is None
