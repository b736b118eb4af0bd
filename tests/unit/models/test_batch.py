"""models/batch.py: Batch.to moves every tensor field (none dropped) and keeps the cache object."""
import pytest
import torch

from qlora_kit.models import Batch

pytestmark = pytest.mark.unit


def test_to_moves_every_tensor_field_and_keeps_the_cache():
    ids = torch.arange(6).view(2, 3)
    cache = object()
    batch = Batch(ids, positions=ids + 5, adapter_ids=torch.tensor([0, 2]), attention_mask=torch.ones_like(ids),
                  segment_ids=torch.zeros_like(ids), cache=cache)
    moved = batch.to("meta")
    for name in ("input_ids", "positions", "adapter_ids", "attention_mask", "segment_ids"):
        assert getattr(moved, name).device.type == "meta", name
    assert moved.cache is cache and batch.positions.device.type == "cpu"  # the original is left where it was
    assert Batch(ids).to("meta").positions is None  # absent fields stay absent
