"""bench/_memory.py: tensor bytes of model, optimizer, grads and the peak of live saved activations."""
import pytest
import torch

from bench._memory import TensorBytes

pytestmark = pytest.mark.unit


def test_counts_saved_activations_once_per_storage_and_not_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters())
    with TensorBytes(model, opt) as mem:
        model(torch.randn(32, 64)).sum().backward()
        opt.step()
    rep = mem.report()
    # saved for backward: the input x (first matmul's weight grad) and the ReLU output (ReLU's backward and the
    # second matmul's weight grad share it); weights are parameters, counted in model_mb, not again
    assert mem.peak == (32 * 64 + 32 * 128) * 4
    assert mem.current == 0  # the graph and the input are gone after backward
    params = sum(p.numel() for p in model.parameters()) * 4
    assert rep["model_mb"] * 2**20 == params
    assert rep["grads_mb"] * 2**20 == params
    assert rep["optimizer_mb"] * 2**20 == 2 * params + 4 * 4  # exp_avg, exp_avg_sq, a float32 step per tensor (4)
    assert rep["tracked_peak_mb"] * 2**20 == params + params + 2 * params + 16 + mem.peak
