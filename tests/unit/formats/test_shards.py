import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.formats import ShardWriter, read_header, spec

pytestmark = pytest.mark.unit


def _tensors():
    return {"a.bf16": torch.randn(3, 5, dtype=torch.bfloat16), "b.u8": torch.arange(7, dtype=torch.uint8),
            "c.f32": torch.randn(4), "d.u8": torch.tensor([1, 2, 3], dtype=torch.uint8), "e.f16": torch.randn(1).half()}


def test_single_shard_round_trips_and_aligns(tmp_path):
    src = _tensors()
    w = ShardWriter(tmp_path, 10**9, {"qlora_kit.source": "x"})
    w.add_group({k: src[k] for k in ("a.bf16", "b.u8")})
    w.add_group({k: src[k] for k in ("c.f32", "d.u8", "e.f16")})
    (path,) = w.close()
    assert path.name == "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # section files removed
    loaded = load_file(str(path))
    assert loaded.keys() == src.keys() and all(torch.equal(loaded[k], src[k]) for k in src)
    header = read_header(path)
    assert header["__metadata__"] == {"format": "pt", spec.METADATA_VERSION_KEY: spec.FORMAT_VERSION,
                                      "qlora_kit.source": "x"}
    (hlen,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert hlen % 8 == 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
    for k, v in header.items():
        if k != "__metadata__":
            assert (8 + hlen + v["data_offsets"][0]) % sizes[v["dtype"]] == 0, k


def test_groups_never_straddle_shards_and_index_lists_all(tmp_path):
    src = _tensors()
    w = ShardWriter(tmp_path, 40)
    w.add_group({"a.bf16": src["a.bf16"], "b.u8": src["b.u8"]})  # 37 bytes
    w.add_group({"c.f32": src["c.f32"]})  # 16 bytes: over 40, new shard
    w.add_group({"d.u8": src["d.u8"], "e.f16": src["e.f16"]})  # 5 bytes: fits beside c
    paths = w.close()
    assert [p.name for p in paths] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a.bf16": paths[0].name, "b.u8": paths[0].name, "c.f32": paths[1].name,
                                   "d.u8": paths[1].name, "e.f16": paths[1].name}
    assert index["metadata"]["total_size"] == 37 + 16 + 5
    loaded = load_file(str(paths[0])) | load_file(str(paths[1]))
    assert all(torch.equal(loaded[k], src[k]) for k in src)
