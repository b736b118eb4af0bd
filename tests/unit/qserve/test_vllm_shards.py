"""qserve.vllm_plugin.shards against the unsplit layer: what vLLM's tensor-parallel ranks get (no vLLM needed).

vLLM's CPU backend cannot run TP=2 for the bundled SmolLM2 (9 attention heads do not divide by 2), so the
cutting rules are checked here: every rank's shard decodes to exactly the matching slice of the whole
weight; column-parallel outputs concatenate, row-parallel partial outputs sum (vLLM's all-reduce) to the
unsplit layer's output; merged q|k|v with replicated k/v heads; and each refusal names the tensor.
"""
import pytest
import torch

from qlora_kit.formats import dequantize_4bit, quantize_4bit
from qlora_kit.kernels import nf4_matmul
from qlora_kit.qserve.vllm_plugin.errors import ShardSplitError
from qlora_kit.qserve.vllm_plugin.shards import concat_rows, rank_slice, take

pytestmark = pytest.mark.unit


def _weight(n, k, blocksize=64, double_quant=True):
    w = torch.randn(n, k) * 0.02
    return quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)


def test_rank_slice_plain_and_replicated_kv():
    assert [rank_slice(256, 128, r, 2, "q") for r in range(2)] == [(0, 128), (128, 256)]
    # 2 kv heads of 64 on 4 ranks: vLLM replicates each head on two neighbouring ranks
    assert [rank_slice(128, 64, r, 4, "k") for r in range(4)] == [(0, 64), (0, 64), (64, 128), (64, 128)]
    assert rank_slice(96, 96, 0, 1, "o") == (0, 96)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("double_quant", [True, False])
def test_row_shards_decode_to_slices(tp, double_quant):
    packed = _weight(256, 192, double_quant=double_quant)
    full = dequantize_4bit(packed, torch.float32)
    for rank in range(tp):
        rows = rank_slice(256, 256 // tp, rank, tp, "w")
        shard = take(packed, rows, (0, 192), "w")
        assert shard.state.shape == (256 // tp, 192) and shard.state.nested is None
        assert torch.equal(dequantize_4bit(shard, torch.float32), full[rows[0]:rows[1]])


@pytest.mark.parametrize("tp", [2, 3])
def test_col_shards_decode_to_slices(tp):
    packed = _weight(96, 64 * 6)
    full = dequantize_4bit(packed, torch.float32)
    for rank in range(tp):
        cols = rank_slice(384, 384 // tp, rank, tp, "w")
        assert torch.equal(dequantize_4bit(take(packed, (0, 96), cols, "w"), torch.float32), full[:, cols[0]:cols[1]])


def test_column_parallel_outputs_concatenate_and_row_parallel_outputs_sum():
    x = torch.randn(5, 256)
    up, down = _weight(512, 256), _weight(256, 512)
    h = torch.cat([nf4_matmul(x, take(up, rank_slice(512, 256, r, 2, "up"), (0, 256), "up")) for r in range(2)], -1)
    assert torch.equal(h, nf4_matmul(x, up))
    partial = [nf4_matmul(h[:, r * 256:(r + 1) * 256], take(down, (0, 256), rank_slice(512, 256, r, 2, "d"), "d"))
               for r in range(2)]
    torch.testing.assert_close(partial[0] + partial[1], nf4_matmul(h, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_qkv_with_replicated_kv_matches_unsplit(tp):
    """q: 4 heads of 64, k/v: 2 heads of 64, hidden 256; the layout vLLM's QKVParallelLinear expects."""
    q, k, v = _weight(256, 256), _weight(128, 256), _weight(128, 256)
    x = torch.randn(3, 256)
    for rank in range(tp):
        q_rows = rank_slice(256, 256 // tp, rank, tp, "q")
        kv_part = max(64, 128 // tp)
        kv_rows = rank_slice(128, kv_part, rank, tp, "k")
        merged = concat_rows([take(q, q_rows, (0, 256), "q"), take(k, kv_rows, (0, 256), "k"),
                              take(v, kv_rows, (0, 256), "v")], "qkv")
        want = torch.cat([dequantize_4bit(q, torch.float32)[q_rows[0]:q_rows[1]],
                          dequantize_4bit(k, torch.float32)[kv_rows[0]:kv_rows[1]],
                          dequantize_4bit(v, torch.float32)[kv_rows[0]:kv_rows[1]]])
        assert torch.equal(dequantize_4bit(merged, torch.float32), want)
        torch.testing.assert_close(nf4_matmul(x, merged), x @ want.t(), rtol=1e-5, atol=1e-5)


def test_whole_weight_is_returned_as_is():
    packed = _weight(64, 128)
    assert take(packed, (0, 64), (0, 128), "w") is packed


def test_odd_element_count_last_row_shard():
    packed = _weight(3, 85, double_quant=False)  # 255 elements: last block partial, last byte half-used
    full = dequantize_4bit(packed, torch.float32)
    with pytest.raises(ShardSplitError, match=r"w: rows 1:3 of \(3, 85\) start or end inside a 64-element"):
        take(packed, (1, 3), (0, 85), "w")
    assert torch.equal(dequantize_4bit(take(packed, (0, 3), (0, 85), "w"), torch.float32), full)


def test_refusals_name_the_tensor_and_the_rule():
    # SmolLM2's o_proj (576 in-features) on 2 ranks: 288 columns are not whole 64-element blocks
    o_proj = _weight(64, 576)
    with pytest.raises(ShardSplitError, match=r"o_proj.weight: columns 0:288 of \(64, 576\) are not whole "
                                              r"64-element quantization blocks"):
        take(o_proj, (0, 64), rank_slice(576, 288, 0, 2, "o_proj.weight"), "o_proj.weight")
    with pytest.raises(ShardSplitError, match=r"q_proj.weight \(out-features\): dimension 576 does not split "
                                              r"into shards of 256 \(tensor_parallel_size=2\)"):
        rank_slice(576, 256, 0, 2, "q_proj.weight (out-features)")
    with pytest.raises(ShardSplitError, match="cuts rows .* and columns .* at once"):
        take(o_proj, (0, 32), (0, 64), "w")
    with pytest.raises(ShardSplitError, match="part 0 of shape \\(1, 96\\) ends inside a 64-element block"):
        concat_rows([_weight(1, 96), _weight(2, 96)], "qkv")
