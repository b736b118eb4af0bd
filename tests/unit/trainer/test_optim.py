"""trainer/optim: AdamW 32-bit vs torch.optim.AdamW, 8-bit and paged variants vs 32-bit, state_dict round trips,
and our 8-bit step vs bitsandbytes' AdamW8bit on CPU."""
import bitsandbytes as bnb
import pytest
import torch

from tests.tolerances import tol
from qlora_kit.trainer.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, signed_dynamic_map, unsigned_dynamic_map

pytestmark = pytest.mark.unit
STEPS, LR = 20, 1e-2


def _problem():
    """A small least-squares problem: weight (300, 24) and bias (300,), 8-bit sized (>= 256 elements per block)."""
    g = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(64, 24, generator=g), torch.randn(300, 24, generator=g)
    y = x @ w_true.t()
    params = [torch.randn(300, 24, generator=g) * 0.1, torch.zeros(300)]
    return x, y, params


def _train(make_opt, steps=STEPS, params=None, opt=None):
    x, y, init = _problem()
    params = params or [p.clone().requires_grad_() for p in init]
    opt = opt or make_opt(params)
    losses = []
    for _ in range(steps):
        loss = ((x @ params[0].t() + params[1] - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return params, opt, losses


def test_adamw32_matches_torch():
    ours, _, _ = _train(lambda p: AdamW(p, lr=LR, weight_decay=0.01))
    ref, _, _ = _train(lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.01, foreach=False))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol("adamw32_vs_torch"))


def test_paged_is_the_same_arithmetic():
    # budget 0 pages every state; pages of 512 elements cut the weight's 7200 into 15 pages
    for plain, paged in [(AdamW, PagedAdamW), (AdamW8bit, PagedAdamW8bit)]:
        ours, opt, _ = _train(lambda p: paged(p, lr=LR, page_size=512, min_8bit_size=0))
        ref, _, _ = _train(lambda p: plain(p, lr=LR, min_8bit_size=0))
        assert all(s["paged"] for s in opt.state.values())
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)


def test_budget_pages_only_what_does_not_fit():
    # the weight's 32-bit states take 8 * 7200 bytes; the bias's 8 * 300 fit a 4000-byte budget, the weight's do not
    params, opt, _ = _train(lambda p: PagedAdamW(p, lr=LR, gpu_memory_budget=4000), steps=1,
                            params=[t.clone().requires_grad_() for t in reversed(_problem()[2])][::-1])
    flags = [opt.state[p]["paged"] for p in params]
    assert flags == [True, False]


def test_8bit_tracks_32bit():
    ours, _, l8 = _train(lambda p: AdamW8bit(p, lr=LR, min_8bit_size=0))
    ref, _, l32 = _train(lambda p: AdamW(p, lr=LR))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol("adamw8bit_vs_adamw32"))
    assert l8[-1] < 0.75 * l8[0] and abs(l8[-1] - l32[-1]) < 1e-3 * l32[-1]


def test_8bit_state_layout():
    params, opt, _ = _train(lambda p: AdamW8bit(p, lr=LR, min_8bit_size=1000), steps=1)
    big, small = (opt.state[p] for p in params)
    assert big["state1"].dtype == torch.uint8 and big["absmax1"].shape == (-(-7200 // 256),)
    assert "exp_avg" in small  # 300 < min_8bit_size keeps 32-bit states, as bitsandbytes does


@pytest.mark.parametrize("make", [AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit], ids=lambda c: c.__name__)
def test_state_dict_round_trip(make, tmp_path):
    def new(p):
        kw = {"page_size": 512} if make in (PagedAdamW, PagedAdamW8bit) else {}
        return make(p, lr=LR, min_8bit_size=0, **kw)

    straight, _, straight_losses = _train(new, steps=10)
    params, opt, first = _train(new, steps=5)
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = new(resumed)
    opt2.load_state_dict(ckpt["opt"])
    for p, old in zip(resumed, params):
        for k, v in opt.state[old].items():
            if isinstance(v, torch.Tensor):
                assert opt2.state[p][k].dtype == v.dtype and torch.equal(opt2.state[p][k], v)
    resumed, _, second = _train(new, steps=5, params=resumed, opt=opt2)
    assert first + second == straight_losses
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_8bit_step_matches_bitsandbytes_on_cpu():
    # bitsandbytes 0.50 runs its blockwise 8-bit update on CPU (backends/cpu/ops.py), so it is the oracle.
    # Its CPU quantizer picks codes through a lookup table, so a few percent of v's codes land one step
    # away from the nearest; one step from equal states agrees, and over 20 steps both stay as close to
    # torch.optim.AdamW as each other.
    torch.manual_seed(0)
    p0, grads = torch.randn(4096) * 0.1, [torch.randn(4096) for _ in range(2)]
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ours = AdamW8bit([a], lr=LR, weight_decay=0.01, min_8bit_size=0)
    theirs = bnb.optim.AdamW8bit([b], lr=LR, weight_decay=0.01, min_8bit_size=0)
    a.grad, b.grad = grads[0].clone(), grads[0].clone()
    ours.step()
    theirs.step()
    sa, sb = ours.state[a], theirs.state[b]
    torch.testing.assert_close(sb["qmap1"], signed_dynamic_map(), rtol=0, atol=0)
    torch.testing.assert_close(sb["qmap2"], unsigned_dynamic_map(), rtol=0, atol=0)
    torch.testing.assert_close(a, b, **tol("adamw8bit_vs_bnb"))
    for k in ("absmax1", "absmax2"):
        torch.testing.assert_close(sa[k], sb[k], **tol("adamw8bit_vs_bnb"))
    for k, qmap in (("state1", signed_dynamic_map()), ("state2", unsigned_dynamic_map())):
        # bnb's table can be one level off (1/64 near 1.0; several codes where the map is dense near 0)
        assert (qmap[sa[k].long()] - qmap[sb[k].long()]).abs().max() <= 1.0 / 64 and (sa[k] != sb[k]).float().mean() < 0.05, k

    ref, _, _ = _train(lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.01, foreach=False))
    mine, _, _ = _train(lambda p: AdamW8bit(p, lr=LR, weight_decay=0.01, min_8bit_size=0))
    bnbs, _, _ = _train(lambda p: bnb.optim.AdamW8bit(p, lr=LR, weight_decay=0.01, min_8bit_size=0))
    err = [sum((x - r).abs().mean().item() for x, r in zip(run, ref)) for run in (mine, bnbs)]
    assert err[0] <= 1.1 * err[1], err


def test_rejects_bad_optim_bits():
    with pytest.raises(ValueError, match="optim_bits=4; use 32 or 8"):
        AdamW([torch.zeros(1, requires_grad=True)], optim_bits=4)
