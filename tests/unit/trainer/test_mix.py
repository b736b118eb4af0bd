"""trainer/many/mix.py: each part's chunked loss equals cross-entropy of full logits, alone or mixed with another
job's rows; mixing keeps every row's adapter id."""
import pytest
import torch
import torch.nn.functional as F

from qlora_kit.formats import LoraConfig
from qlora_kit.models import add_adapter, adapter_params, load_model
from qlora_kit.trainer.batching import collate
from qlora_kit.trainer.data import IGNORE, load_examples
from qlora_kit.trainer.many.mix import Part, mix, part_losses
from tests.tolerances import tol

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model(tiny_chat):
    m = load_model(tiny_chat, compute_dtype=torch.float32)
    torch.manual_seed(0)
    for slot in (0, 3):
        add_adapter(m, slot, LoraConfig(r=4, lora_alpha=8, target_modules=("all-linear",), lora_dropout=0.1))
        for p in adapter_params(m, slot).values():
            p.data.normal_(0, 0.05)
    return m.train()


def _full_logits_loss(model, step):
    logits = model(step.batch).float()
    return F.cross_entropy(logits.flatten(0, 1), step.labels.flatten(), ignore_index=IGNORE, reduction="sum")


def test_chunked_loss_equals_full_logits_cross_entropy(model, tiny_tok, chat_data):
    ex = load_examples(chat_data, tiny_tok, 128)
    step = collate([[0, 1], [2, 3]], ex, tiny_tok.pad_token_id, True, 0)
    model.eval()
    with torch.no_grad():
        got = part_losses(model, step, [slice(None)], checkpointing=False, chunk_size=7)[0]
        ref = _full_logits_loss(model, step)
    model.train()
    torch.testing.assert_close(got, ref, **tol("trainer_loss_vs_full_logits"))


def test_mixed_parts_keep_their_adapters_and_losses(model, tiny_tok, chat_data):
    ex = load_examples(chat_data, tiny_tok, 128)
    packed = collate([[0, 1], [2, 3]], ex, tiny_tok.pad_token_id, True, 0)  # adapter 0, packed rows
    padded = collate([[4], [5], [6]], ex, tiny_tok.pad_token_id, False, 3)  # adapter 3, right-padded rows
    step, rows = mix([Part(None, packed), Part(None, padded)], tiny_tok.pad_token_id)
    assert step.batch.adapter_ids.tolist() == [0, 0, 3, 3, 3] and rows == [slice(0, 2), slice(2, 5)]
    assert (step.num_tokens, step.num_loss_tokens) == (packed.num_tokens + padded.num_tokens,
                                                       packed.num_loss_tokens + padded.num_loss_tokens)
    model.eval()
    with torch.no_grad():
        got = part_losses(model, step, rows, checkpointing=False, chunk_size=7)
        ref = [_full_logits_loss(model, packed), _full_logits_loss(model, padded)]
    model.train()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **tol("trainer_loss_vs_full_logits"))
