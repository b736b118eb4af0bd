"""adamw8bit (Triton, interpreted) vs adamw8bit_ref: parameters, codes and absmax after a few steps."""
import pytest
import torch

from qlora_kit.kernels import adamw8bit
from tests.tolerances import tol
from qlora_kit.trainer.optim import signed_dynamic_map, unsigned_dynamic_map

pytestmark = pytest.mark.unit
SIZES = {"tiny": 256, "irregular": 1000, "llama7b_lora_a_r2": 2 * 4096}


def _states(n, blocksize=256):
    blocks = -(-n // blocksize)
    return [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(blocks)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES.values(), ids=SIZES.keys())
def test_triton_matches_twin(n, dtype):
    q1, q2 = signed_dynamic_map(), unsigned_dynamic_map()
    p0 = torch.randn(n).to(dtype)
    runs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        p, states = p0.clone(), _states(n)
        for t in range(1, 4):
            adamw8bit(p, torch.randn(n), *states, q1, q2, t, 1e-2, 0.9, 0.999, 1e-8, 0.01, backend=backend)
        runs[backend] = (p, states)
    (p_tr, s_tr), (p_ref, s_ref) = runs["triton"], runs["torch"]
    torch.testing.assert_close(p_tr.float(), p_ref.float(), **(tol("adamw8bit") if dtype == torch.float32 else tol("rope", dtype)))
    for a, b in zip(s_tr[2:], s_ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(s_tr[:2], s_ref[:2]):
        # the same nearest-code rule; an fp32 rounding difference can flip a value sitting on a midpoint
        assert (a.int() - b.int()).abs().max().item() <= 1 and (a != b).float().mean().item() < 1e-3


def test_rejects_wrong_state_dtype():
    n = 256
    states = _states(n)
    states[0] = states[0].float()
    with pytest.raises(ValueError, match="states uint8"):
        adamw8bit(torch.randn(n), torch.randn(n), *states, signed_dynamic_map(), unsigned_dynamic_map(), 1, 1e-3,
                  0.9, 0.999, 1e-8, 0.0, backend="triton")


def test_multi_tensor_launch_matches_twin_per_tensor():
    # one launch per dtype group over tensors of different sizes (a partial last block included) == the twin per tensor
    from qlora_kit.kernels import adamw8bit_multi

    q1, q2 = signed_dynamic_map(), unsigned_dynamic_map()
    specs = [(256, torch.float32, torch.float32), (1000, torch.float32, torch.float32), (777, torch.bfloat16, torch.float32),
             (4096, torch.bfloat16, torch.bfloat16)]
    p0 = [torch.randn(n).to(dt) for n, dt, _ in specs]
    runs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        ps = [p.clone() for p in p0]
        states = [_states(n) for n, _, _ in specs]
        for t in range(1, 4):
            grads = [torch.randn(n).to(gdt) for n, _, gdt in specs]
            adamw8bit_multi(ps, grads, *[[s[j] for s in states] for j in range(4)], q1, q2, t, 1e-2, 0.9, 0.999, 1e-8, 0.01,
                            backend=backend)
        runs[backend] = (ps, states)
    for p_tr, p_ref, (_, dt, _) in zip(runs["triton"][0], runs["torch"][0], specs):
        torch.testing.assert_close(p_tr.float(), p_ref.float(), **(tol("adamw8bit") if dt == torch.float32 else tol("rope", dt)))
    for s_tr, s_ref in zip(runs["triton"][1], runs["torch"][1]):
        for a, b in zip(s_tr[2:], s_ref[2:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_multi_rejects_mismatched_lists():
    from qlora_kit.kernels import adamw8bit_multi

    with pytest.raises(ValueError, match="list lengths"):
        adamw8bit_multi([torch.randn(256)], [], [], [], [], [], signed_dynamic_map(), unsigned_dynamic_map(), 1, 1e-3,
                        0.9, 0.999, 1e-8, 0.0, backend="triton")
