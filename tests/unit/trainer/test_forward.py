"""trainer/forward.py: the chunked loss equals cross-entropy of full logits; checkpointing changes nothing."""
import pytest
import torch
import torch.nn.functional as F

from qlora_kit.formats import LoraConfig
from qlora_kit.models import add_adapter, adapter_params, load_model
from qlora_kit.trainer.batching import collate
from qlora_kit.trainer.data import IGNORE, load_examples
from qlora_kit.trainer.forward import summed_loss
from tests.tolerances import tol

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model(tiny_chat):
    m = load_model(tiny_chat, compute_dtype=torch.float32)
    torch.manual_seed(0)
    add_adapter(m, 0, LoraConfig(r=4, lora_alpha=8, target_modules=("all-linear",), lora_dropout=0.1))
    for p in adapter_params(m, 0).values():
        p.data.normal_(0, 0.05)
    return m.train()


def _step(tiny_tok, chat_data):
    ex = load_examples(chat_data, tiny_tok, 128)
    return collate([[0, 1], [2, 3]], ex, tiny_tok.pad_token_id, True)


def test_chunked_loss_equals_full_logits_cross_entropy(model, tiny_tok, chat_data):
    step = _step(tiny_tok, chat_data)
    model.eval()
    with torch.no_grad():
        got = summed_loss(model, step, checkpointing=False, chunk_size=7)
        logits = model(step.batch).float()
        ref = F.cross_entropy(logits.flatten(0, 1), step.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    model.train()
    torch.testing.assert_close(got, ref, **tol("trainer_loss_vs_full_logits"))


def test_checkpointing_gives_the_same_loss_and_gradients(model, tiny_tok, chat_data):
    step = _step(tiny_tok, chat_data)
    params = adapter_params(model, 0)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(1)  # same dropout masks; checkpoint replays the RNG for the recompute
        loss = summed_loss(model, step, checkpointing=ckpt)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in params.items()}))
        model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **tol("trainer_checkpointing_grad"))
