"""BlockManager driven by hand-built requests: allocation, free list, prefix hits keyed by adapter."""
import pytest

from qlora_kit.qserve.engine.block_manager import BlockManager
from qlora_kit.qserve.engine.request import Request

pytestmark = pytest.mark.unit


def req(tokens, uid=0, rid=None):
    r = Request(tokens, request_id=rid)
    r.adapter_uid = uid
    return r


def run(bm, r, n):
    """Allocate for n tokens and mark them computed, as a scheduler step + update would."""
    assert bm.allocate(r, n)
    r.num_computed_tokens += n
    bm.cache_full_blocks(r)


def test_config_errors():
    with pytest.raises(ValueError, match="num_blocks=0: must be an integer >= 1"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size=-1: must be an integer >= 1"):
        BlockManager(4, -1)


def test_allocate_append_free():
    bm = BlockManager(4, 4)
    r = req(list(range(6)))
    assert bm.num_new_blocks(r, 6) == 2
    run(bm, r, 6)
    assert len(r.block_table) == 2 and bm.num_free_blocks == 2
    r.output_token_ids += [100, 101]  # decode steps: 7th fits block 2, 9th needs a new one
    assert bm.append_slot(r) and len(r.block_table) == 2
    r.num_computed_tokens += 1
    r.output_token_ids.append(102)
    r.num_computed_tokens += 1
    assert bm.append_slot(r) and len(r.block_table) == 3
    bm.free(r)
    assert bm.num_free_blocks == 4 and r.block_table == [] and r.num_computed_tokens == 0


def test_all_or_nothing_when_full():
    bm = BlockManager(3, 2)
    a = req([1, 2, 3, 4])
    run(bm, a, 4)
    b = req([5, 6, 7, 8])
    assert not bm.can_allocate(b, 4)
    assert not bm.allocate(b, 4)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate(b, 2)  # a chunk that fits


def test_prefix_hit_same_adapter_and_counters():
    bm = BlockManager(8, 4)
    a = req(list(range(10)))
    run(bm, a, 10)
    assert len(a.block_hashes) == 2  # blocks [0..3], [4..7] are full
    b = req(list(range(9)) + [99])
    cached = bm.lookup_prefix(b)
    assert cached == a.block_table[:2]
    assert bm.allocate(b, 2, cached)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and len(b.block_table) == 3
    assert bm.blocks[cached[0]].ref_count == 2
    assert bm.stats()["prefix_hit_tokens"] == 8 and bm.stats()["prefix_query_tokens"] == 20


def test_prefix_keyed_by_adapter():
    bm = BlockManager(8, 4)
    a = req(list(range(9)), uid=1)
    run(bm, a, 9)
    assert bm.lookup_prefix(req(list(range(9)), uid=2)) == []
    assert bm.lookup_prefix(req(list(range(9)), uid=0)) == []
    assert len(bm.lookup_prefix(req(list(range(9)), uid=1))) == 2


def test_prefix_leaves_one_token_to_compute():
    bm = BlockManager(8, 4)
    a = req(list(range(8)))
    run(bm, a, 8)
    assert len(bm.lookup_prefix(req(list(range(8))))) == 1  # 8 tokens: only the first block may hit
    assert len(bm.lookup_prefix(req(list(range(9))))) == 2


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, 2)
    a = req([1, 2, 3, 4, 5])
    run(bm, a, 5)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = req([1, 2, 3, 4, 9])
    cached = bm.lookup_prefix(b)
    assert len(cached) == 2
    assert bm.allocate(b, 1, cached) and bm.num_free_blocks == 1  # two revived + one new
    bm.free(b)
    # Fill the cache with other tokens: the cached blocks get recycled and their hashes forgotten.
    c = req(list(range(100, 108)))
    run(bm, c, 8)
    assert bm.lookup_prefix(req([1, 2, 3, 4, 9])) == []


def test_revived_blocks_count_against_free_list():
    bm = BlockManager(3, 2)
    a = req([1, 2, 3, 4, 5])
    run(bm, a, 5)
    bm.free(a)
    b = req([1, 2, 3, 4, 5, 6, 7, 8, 9])
    cached = bm.lookup_prefix(b)
    assert len(cached) == 2
    assert not bm.can_allocate(b, 5, cached)  # 2 revived + 3 new > 3 free
    assert bm.allocate(b, 1, cached) and b.num_computed_tokens == 4


def test_identical_prompts_share_after_compute():
    bm = BlockManager(8, 2)
    a, b = req([1, 2, 3]), req([1, 2, 3])
    run(bm, a, 3)
    run(bm, b, 3)  # computed concurrently (no lookup): both register; the first mapping wins
    c = req([1, 2, 3])
    assert bm.lookup_prefix(c) == [a.block_table[0]]


def test_disabled_prefix_cache_and_reset():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    a = req([1, 2, 3])
    run(bm, a, 3)
    assert bm.lookup_prefix(req([1, 2, 3])) == []
    bm2 = BlockManager(4, 2)
    run(bm2, req([1, 2, 3]), 3)
    bm2.reset_prefix_cache()
    assert bm2.lookup_prefix(req([1, 2, 3])) == []
