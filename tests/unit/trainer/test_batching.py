"""trainer/batching.py: seeded epoch plans, first-fit packing, and packed rows that equal separate rows."""
import pytest
import torch

from qlora_kit.models import BASE_ONLY, Batch, load_model
from qlora_kit.trainer.batching import collate, plan_epoch
from qlora_kit.trainer.data import IGNORE, load_examples
from tests.tolerances import tol

pytestmark = pytest.mark.unit

LENGTHS = [5, 17, 9, 30, 2, 11, 25, 8, 13, 7, 21, 3]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("group", [True, False])
def test_plan_covers_every_example_once_and_is_seeded(packing, group):
    plan = plan_epoch(LENGTHS, 0, 1, 2, 32, packing, group)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(len(batch) <= 2 for batch in plan)
    assert all(sum(LENGTHS[i] for i in row) <= 32 for batch in plan for row in batch)
    assert plan == plan_epoch(LENGTHS, 0, 1, 2, 32, packing, group)
    assert plan != plan_epoch(LENGTHS, 1, 1, 2, 32, packing, group)


def test_packing_fills_rows():
    plan = plan_epoch(LENGTHS, 0, 0, 1, 64, True, True)
    assert len(plan) == 3  # 151 tokens in rows of 64


def test_collate_packed_segments_and_labels(tiny_tok, chat_data):
    ex = load_examples(chat_data, tiny_tok, 128)
    step = collate([[0, 1], [2]], ex, tiny_tok.pad_token_id, packed=True, adapter_id=3)
    b = step.batch
    assert b.adapter_ids.tolist() == [3, 3]  # every row trains the caller's LoRA slot
    n0, n1, n2 = len(ex[0]), len(ex[1]), len(ex[2])
    assert b.segment_ids[0, :n0].eq(0).all() and b.segment_ids[0, n0:n0 + n1].eq(1).all()
    assert b.segment_ids[1, n2:].eq(-1).all() and b.attention_mask is None
    pos = b.resolved_positions()
    assert pos[0, n0] == 0 and pos[0, n0 + n1 - 1] == n1 - 1  # positions restart in each packed example
    assert step.labels[0, n0 - 1] == IGNORE  # the last token of example 0 is never trained on example 1
    assert step.num_tokens == n0 + n1 + n2
    assert step.num_loss_tokens == sum(sum(y != IGNORE for y in ex[i].labels) for i in range(3))


@torch.no_grad()
def test_packed_row_equals_examples_run_alone(tiny_chat, tiny_tok, chat_data):
    model = load_model(tiny_chat, compute_dtype=torch.float32)
    ex = load_examples(chat_data, tiny_tok, 128)
    packed = model.hidden_states(collate([[0, 1, 2]], ex, tiny_tok.pad_token_id, True, BASE_ONLY).batch)
    t = 0
    for i in range(3):
        alone = model.hidden_states(Batch(torch.tensor([ex[i].input_ids])))
        torch.testing.assert_close(packed[:, t:t + len(ex[i])], alone, **tol("packed_vs_separate"))
        t += len(ex[i])
    padded = model.hidden_states(collate([[3], [4]], ex, tiny_tok.pad_token_id, False, BASE_ONLY).batch)
    alone = model.hidden_states(Batch(torch.tensor([ex[4].input_ids])))
    torch.testing.assert_close(padded[1:, :len(ex[4])], alone, **tol("packed_vs_separate"))


def test_step_batch_to_moves_every_field(tiny_tok, chat_data):
    ex = load_examples(chat_data, tiny_tok, 128)
    step = collate([[0], [5], [11]], ex, tiny_tok.pad_token_id, False, 2)
    step.batch.positions = step.batch.resolved_positions()  # a field collate leaves empty must travel too
    moved = step.to("meta")
    for name in ("input_ids", "positions", "adapter_ids", "attention_mask", "segment_ids"):
        before = getattr(step.batch, name)
        assert (getattr(moved.batch, name) is None) == (before is None), name
        assert before is None or getattr(moved.batch, name).device.type == "meta", name
    assert moved.labels.device.type == "meta"
    assert (moved.num_tokens, moved.num_loss_tokens) == (step.num_tokens, step.num_loss_tokens)
