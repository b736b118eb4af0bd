"""Masks and the KV cache: padded, packed and cached forwards equal plain forwards of the same tokens."""
import pytest
import torch

from qlora_kit.models import Batch, Llama, StaticKVCache, config_from_hf
from tests.tolerances import tol

pytestmark = pytest.mark.unit

CFG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(config_from_hf(CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _close(a, b):
    torch.testing.assert_close(a, b, **tol("cache_vs_full"))


@torch.no_grad()
def test_left_and_right_padding_equal_unpadded(model):
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 4))
    ref_a, ref_b = model(Batch(a)), model(Batch(b))
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = a[0], b[0]  # row 1 left-padded
    mask = ids != 0
    mask[0] = True
    mask[1, :3] = False
    out = model(Batch(ids, attention_mask=mask))
    _close(out[0:1], ref_a)
    _close(out[1:2, 3:], ref_b)
    right = torch.zeros(1, 7, dtype=torch.long)
    right[0, :4] = b[0]
    out = model(Batch(right, attention_mask=torch.arange(7).unsqueeze(0) < 4))
    _close(out[:, :4], ref_b)


@torch.no_grad()
def test_packed_segments_equal_separate_sequences(model):
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 3))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 5 + [1] * 3])
    batch = Batch(packed, segment_ids=seg)
    assert batch.resolved_positions().tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    out = model(batch)
    _close(out[:, :5], model(Batch(a)))
    _close(out[:, 5:], model(Batch(b)))


@torch.no_grad()
def test_cached_prefill_and_decode_equal_full_forward(model):
    ids = torch.randint(0, 64, (2, 9))
    full = model(Batch(ids))
    cfg = model.cfg
    cache = StaticKVCache(cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    _close(model(Batch(ids[:, :6], cache=cache)), full[:, :6])
    for t in range(6, 9):
        _close(model(Batch(ids[:, t:t + 1], cache=cache)), full[:, t:t + 1])
    assert cache.length == 9 and cache.row_lengths.tolist() == [9, 9]


def test_cache_overflow_and_packed_cache_are_refused(model):
    cfg = model.cfg
    cache = StaticKVCache(cfg.num_layers, 1, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    with pytest.raises(ValueError, match="exceed max_len=4"):
        model(Batch(torch.zeros(1, 5, dtype=torch.long), cache=cache))
    with pytest.raises(ValueError, match="segment_ids"):
        model(Batch(torch.zeros(1, 2, dtype=torch.long), segment_ids=torch.zeros(1, 2, dtype=torch.long), cache=cache))
    with pytest.raises(ValueError, match="adapter_ids must be"):
        Batch(torch.zeros(2, 2, dtype=torch.long), adapter_ids=torch.zeros(3, dtype=torch.long))
