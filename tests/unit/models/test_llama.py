"""models/llama.py's checkpointing flag: the same loss and LoRA gradients with and without it, and under it each
NF4 layer's recompute and backward share one 4-bit decode (issue 17)."""
import pytest
import torch
import torch.nn.functional as F

from qlora_kit.formats import LoraConfig
from qlora_kit.kernels.cpu import nf4 as cpu_nf4
from qlora_kit.models import Batch, NF4Linear, adapter_params, add_adapter, load_model
from tests.tolerances import tol
from tests.unit.models._tiny import write_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny("llama", tmp_path_factory.mktemp("llama") / "model")


def _model(folder, quantize: bool):
    m = load_model(folder, quantize=quantize, compute_dtype=torch.float32)
    torch.manual_seed(0)
    add_adapter(m, 0, LoraConfig(r=4, lora_alpha=8, target_modules=("all-linear",), lora_dropout=0.1))
    for p in adapter_params(m, 0).values():
        p.data.normal_(0, 0.05)
    return m.train()


def _loss(model, ids, checkpointing):
    h = model.hidden_states(Batch(ids, adapter_ids=torch.zeros(ids.shape[0], dtype=torch.long)), checkpointing)
    logits = model.logits(h[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def test_checkpointing_gives_the_same_loss_and_gradients(folder):
    model = _model(folder, quantize=False)
    ids = torch.randint(0, 128, (2, 40))
    params = adapter_params(model, 0)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(1)  # same dropout masks; checkpoint replays the RNG for the recompute
        loss = _loss(model, ids, ckpt)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in params.items()}))
        model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **tol("trainer_checkpointing_grad"))


def test_checkpointed_recompute_and_backward_share_one_decode(folder, monkeypatch):
    model = _model(folder, quantize=True)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    decodes = []
    real = cpu_nf4.dequant_cpu
    monkeypatch.setattr(cpu_nf4, "dequant_cpu", lambda *a, **k: decodes.append(1) or real(*a, **k))
    ids = torch.randint(0, 128, (2, 100))  # 200 rows: a training-sized batch
    _loss(model, ids, checkpointing=True).backward()
    # forward, recompute (kept), backward (reuses the recompute's): 2 decodes per layer, not 3
    assert len(decodes) == 2 * len(layers) and all(m.share_decode for m in layers)
    with torch.no_grad():
        _loss(model, ids, checkpointing=False)  # a plain forward (eval, serving) keeps no decoded weight
    assert not any(m.share_decode for m in layers)
