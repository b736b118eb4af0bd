"""LoraLinear: y = base(x) + s B A dropout(x), several adapters by id, per-row selection."""
import math

import pytest
import torch
import torch.nn.functional as F

from qlora_kit.formats import dequantize_4bit, quantize_4bit
from qlora_kit.models import LoraLinear, NF4Linear
from tests.tolerances import tol

pytestmark = pytest.mark.unit


def _lora(in_f=64, out_f=32):
    base = NF4Linear(in_f, out_f)
    packed = quantize_4bit(torch.randn(out_f, in_f) * 0.05)
    base.set_packed(packed)
    return LoraLinear(base, in_f, out_f), dequantize_4bit(packed, torch.float32)


def test_fresh_adapter_equals_base_and_has_kaiming_a():
    layer, w = _lora()
    layer.add_adapter(0, rank=8, scale=2.0)
    x = torch.randn(2, 3, 64)
    assert torch.equal(layer(x, torch.tensor([0, 0])), layer.base(x))
    # the base is kernels.nf4_matmul (fp32 accumulation in its own order), not this F.linear
    torch.testing.assert_close(layer.base(x), F.linear(x, w), **tol("nf4_matmul", torch.float32))
    assert torch.count_nonzero(layer.lora_b["0"]) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    a = layer.lora_a["0"]
    assert a.abs().max() <= bound and a.std() > bound / 3
    assert set(layer.adapter_params()) == {"lora_a.0", "lora_b.0"}


def test_output_and_gradients_equal_autograd_on_dequantized_weight():
    layer, w = _lora()
    layer.add_adapter(3, rank=4, scale=16 / 4)
    with torch.no_grad():
        layer.lora_b["3"].normal_()
    a_ref = layer.lora_a["3"].detach().clone().requires_grad_(True)
    b_ref = layer.lora_b["3"].detach().clone().requires_grad_(True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x, torch.tensor([3, 3]))
    y_ref = F.linear(x_ref, w) + 4.0 * (x_ref @ a_ref.t() @ b_ref.t())
    torch.testing.assert_close(y, y_ref, **tol("lora_grad"))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, ref in ((x.grad, x_ref.grad), (layer.lora_a["3"].grad, a_ref.grad), (layer.lora_b["3"].grad, b_ref.grad)):
        torch.testing.assert_close(got, ref, **tol("lora_grad"))


def test_mixed_rows_equal_each_row_alone():
    layer, _ = _lora()
    for i, r in ((1, 2), (2, 8), (3, 16)):
        layer.add_adapter(i, rank=r, scale=1.0 / r)
        with torch.no_grad():
            layer.lora_b[str(i)].normal_()
    ids = torch.tensor([1, -1, 3, 2, 1])
    x = torch.randn(5, 4, 64)
    mixed = layer(x, ids)
    for row, i in enumerate(ids.tolist()):
        alone = layer(x[row:row + 1], torch.tensor([i]))
        torch.testing.assert_close(mixed[row:row + 1], alone, **tol("mixed_batch"))
    assert torch.equal(mixed[1], layer(x[1:2], None)[0])


def test_dropout_only_in_training_and_remove():
    layer, w = _lora()
    layer.add_adapter(0, rank=4, scale=1.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b["0"].normal_()
    x = torch.randn(1, 8, 64)
    layer.eval()
    assert torch.equal(layer(x, torch.tensor([0])), layer(x, torch.tensor([0])))
    layer.train()
    assert not torch.equal(layer(x, torch.tensor([0])), layer(x, torch.tensor([0])))
    layer.remove_adapter(0)
    assert layer.adapter_ids == [] and torch.equal(layer(x, torch.tensor([0])), layer.base(x))


def test_bad_adapter_arguments():
    layer, _ = _lora()
    with pytest.raises(ValueError, match="adapter_id=-1"):
        layer.add_adapter(-1, rank=4, scale=1.0)
    with pytest.raises(ValueError, match="rank=0"):
        layer.add_adapter(0, rank=0, scale=1.0)


def _many(n, ranks=(2, 4, 8)):
    layer, w = _lora()
    for i in range(n):
        layer.add_adapter(i * 3 + 1, rank=ranks[i % len(ranks)], scale=2.0 / ranks[i % len(ranks)])
        with torch.no_grad():
            layer.lora_b[str(i * 3 + 1)].normal_()
    return layer, w


def _group_of(n_layers, in_f=64, outs=(32, 16, 48)):
    """n_layers LoraLinear over one input with the same adapters (ids, ranks, scales), as q/k/v."""
    layers = []
    for out_f in outs[:n_layers]:
        layer, _ = _lora(in_f, out_f)
        for i, r in ((1, 2), (4, 8), (7, 2), (9, 16)):
            layer.add_adapter(i, rank=r, scale=2.0 / r)
            with torch.no_grad():
                layer.lora_b[str(i)].normal_()
        layers.append(layer)
    return layers


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_group_equals_each_layer_bit_for_bit(mode, monkeypatch):
    # serving: q/k/v (three layers sharing x) make one lora_multi_group call whose outputs equal the layers' own
    # forwards exactly; rows of every kind (-1, an id no layer has, runs of one adapter)
    from qlora_kit import kernels
    from qlora_kit.models.lora import forward_group

    layers = _group_of(3)
    ids, x = torch.tensor([1, -1, 9, 4, 4, 5, 7]), torch.randn(7, 3, 64)
    calls = []
    real = kernels.lora_multi_group
    monkeypatch.setattr(kernels, "lora_multi_group", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        want = [layer(x, ids) for layer in layers]
        got = forward_group(tuple(layers), x, ids)
    assert calls == [3]
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


def test_forward_group_runs_each_layer_when_it_cannot_share():
    # different scales between the layers, one adapter for every row, training (autograd): each layer's forward
    from qlora_kit.models.lora import forward_group

    layers = _group_of(2)
    x = torch.randn(4, 2, 64)
    layers[1].scales[4] = 0.5
    layers[1]._packing = None
    mixed, uniform = torch.tensor([1, 4, -1, 9]), torch.tensor([4, 4, 4, 4])
    with torch.no_grad():
        for ids in (mixed, uniform):
            for g, w in zip(forward_group(tuple(layers), x, ids), [layer(x, ids) for layer in layers]):
                assert torch.equal(g, w)
    x.requires_grad_()
    ys = forward_group(tuple(layers), x, mixed)
    sum(y.sum() for y in ys).backward()
    assert x.grad is not None and layers[0].lora_a["4"].grad is not None and layers[1].lora_b["1"].grad is not None


def test_mixed_path_reuses_its_packing_and_sees_in_place_writes():
    # serving: the packed A/B are made once, not per forward; an in-place write (an adapter install) refreshes them
    layer, w = _many(5)
    ids, x = torch.tensor([1, 4, 7, 10, 13, -1, 4]), torch.randn(7, 1, 64)
    with torch.no_grad():
        first = layer(x, ids)
        packed = layer._packing.cache[1]
        assert torch.equal(layer(x, ids.clone()), first) and layer._packing.cache[1] is packed
        layer.lora_b["4"].mul_(2.0)
        again = layer(x, ids.clone())
    assert not torch.equal(again[1], first[1]) and torch.equal(again[0], first[0])
    delta = 2.0 / 4 * (x[1] @ layer.lora_a["4"].t() @ layer.lora_b["4"].t())
    torch.testing.assert_close(again[1], F.linear(x[1], w) + delta, **tol("mixed_batch"))


def test_mixed_path_gradients_equal_each_adapter_alone():
    # train-many: one lora_multi call for all rows gives every adapter the gradient of its own rows
    layer, _ = _many(6)
    ids, x = torch.tensor([1, 4, 4, 16, -1, 10, 13, 1]), torch.randn(8, 3, 64)
    dy = torch.randn(8, 3, 32)
    layer(x, ids).backward(dy)
    mixed = {k: p.grad.clone() for k, p in layer.adapter_params().items()}
    layer.zero_grad()
    for row, i in enumerate(ids.tolist()):
        if i >= 0:
            layer(x[row:row + 1], torch.tensor([i])).backward(dy[row:row + 1])
    for k, p in layer.adapter_params().items():
        want = torch.zeros_like(p) if p.grad is None else p.grad  # adapter 7 has no row
        torch.testing.assert_close(mixed[k], want, **tol("lora_grad"), msg=k)
    assert layer.lora_a["7"].grad is None


def test_mixed_path_is_one_lora_multi_call(monkeypatch):
    from qlora_kit import kernels
    layer, _ = _many(32)
    calls = []
    real = kernels.lora_multi
    monkeypatch.setattr(kernels, "lora_multi", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    with torch.no_grad():
        layer(torch.randn(32, 1, 64), torch.arange(32) * 3 + 1)
    assert len(calls) == 1 and calls[0].shape == (32, 1)


def test_rows_of_an_adapter_this_layer_lacks_get_the_base_only():
    # an adapter that targets other modules: its rows (ids above, below and between this layer's) get base(x)
    layer, _ = _many(2)  # ids 1 and 4
    ids, x = torch.tensor([4, 9, 1, 2, 0]), torch.randn(5, 2, 64)
    y = layer(x, ids)
    for row in (1, 3, 4):
        assert torch.equal(y[row], layer(x, None)[row])


def test_packing_follows_a_dtype_change_of_the_module():
    from qlora_kit.models.nf4_linear import dense_linear

    layer = LoraLinear(dense_linear(64, 32), 64, 32)
    for i in (1, 4, 7):
        layer.add_adapter(i, rank=4, scale=0.5)
        with torch.no_grad():
            layer.lora_b[str(i)].normal_()
    ids, x = torch.tensor([1, 4, 7]), torch.randn(3, 2, 64)
    with torch.no_grad():
        want = layer(x, ids)
        layer.to(torch.bfloat16)
        got = layer(x.bfloat16(), ids)
    assert layer._packing.cache[1].dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, **tol("lora", torch.bfloat16))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_write_adapter_rewrites_one_slot_in_place_and_keeps_the_packing(mode):
    # serving's slot reuse: the Parameters and the packed A/B stay, only the written adapter's slice changes
    layer, w = _many(5)  # ids 1, 4, 7, 10, 13 of ranks 2, 4, 8, 2, 4
    ids, x = torch.tensor([1, 4, 7, 10, 13, -1, 7]), torch.randn(7, 1, 64)
    a, b = torch.randn(8, 64), torch.randn(32, 8)
    with mode():
        before = layer(x, ids)
    pa, pb, packing, (_, ca, cb) = layer.lora_a["7"], layer.lora_b["7"], layer._packing, layer._packing.cache
    assert layer.write_adapter(7, a, b, scale=0.25)
    with mode():
        got = layer(x, ids.clone())
    assert layer.lora_a["7"] is pa and layer.lora_b["7"] is pb and torch.equal(pa, a) and torch.equal(pb, b)
    assert layer._packing is packing and layer._packing.cache[1] is ca and layer._packing.cache[2] is cb
    for row in (0, 1, 3, 4, 5):
        assert torch.equal(got[row], before[row])
    layer._packing = None  # the oracle: a packing made afresh from the Parameters
    with mode():
        assert torch.equal(layer(x, ids.clone()), got)
    delta = 0.25 * (x[2] @ a.t() @ b.t())
    torch.testing.assert_close(got[2], F.linear(x[2], w) + delta, **tol("mixed_batch"))
    with mode():  # the one-adapter path reads the Parameters
        torch.testing.assert_close(layer(x[2:3], torch.tensor([7])), got[2:3], **tol("mixed_batch"))


def test_write_adapter_refuses_another_shape_or_dtype_and_changes_nothing():
    layer, _ = _many(3)  # ids 1, 4, 7 of ranks 2, 4, 8
    kept = {k: p.detach().clone() for k, p in layer.adapter_params().items()}
    assert not layer.write_adapter(4, torch.randn(8, 64), torch.randn(32, 8), 1.0)  # rank 4 held, rank 8 given
    assert not layer.write_adapter(4, torch.randn(4, 64).bfloat16(), torch.randn(32, 4).bfloat16(), 1.0)
    assert not layer.write_adapter(5, torch.randn(4, 64), torch.randn(32, 4), 1.0)  # no adapter 5
    assert all(torch.equal(p, kept[k]) for k, p in layer.adapter_params().items()) and layer.scales[4] == 0.5


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_group_sees_a_slot_rewritten_with_another_scale(mode):
    # a server reuses a slot (write_adapter) for an adapter whose scale differs per module (PEFT alpha_pattern):
    # the group must not apply q's new scale to k; after both are rewritten alike it shares one call again
    from qlora_kit.models.lora import forward_group

    layers = _group_of(2)
    ids, x = torch.tensor([1, 4, -1, 9, 4]), torch.randn(5, 2, 64)
    with mode():
        forward_group(tuple(layers), x, ids)  # packings and their packed caches exist, as in a running server
    for layer, scale in zip(layers, (0.75, 0.125)):
        assert layer.write_adapter(4, torch.randn(8, 64), torch.randn(layer.out_features, 8), scale=scale)
    with mode():
        got = forward_group(tuple(layers), x, ids.clone())
    for layer, g in zip(layers, got):
        fresh = LoraLinear(layer.base, 64, layer.out_features)
        for i in layer.adapter_ids:
            fresh.add_adapter(i, rank=layer.lora_a[str(i)].shape[0], scale=layer.scales[i])
            with torch.no_grad():
                fresh.lora_a[str(i)].copy_(layer.lora_a[str(i)])
                fresh.lora_b[str(i)].copy_(layer.lora_b[str(i)])
        with mode():
            assert torch.equal(g, fresh(x, ids.clone()))


def test_serving_packing_is_the_parameters_storage_and_training_gets_it_back():
    # without grad the packed A/B are the Parameters' storage (an in-place write needs no repack); a forward with
    # grad first gives every Parameter contiguous storage of its own, so training runs as on a layer that never served
    layer, _ = _many(5)  # ids 1, 4, 7, 10, 13 of ranks 2, 4, 8, 2, 4: packed (2, 1) (2, 10) (4, 4) (4, 13) (8, 7)

    def unserved():
        twin = LoraLinear(layer.base, 64, 32)
        for i in layer.adapter_ids:
            twin.add_adapter(i, rank=layer.lora_a[str(i)].shape[0], scale=layer.scales[i])
            with torch.no_grad():
                twin.lora_a[str(i)].copy_(layer.lora_a[str(i)])
                twin.lora_b[str(i)].copy_(layer.lora_b[str(i)])
        return twin

    ids, x = torch.tensor([1, 4, 7, 10, 13, -1, 4]), torch.randn(7, 3, 64)
    with torch.inference_mode():
        layer(x, ids)
    _, ca, cb = layer._packing.cache
    pa, pb = layer.lora_a["7"], layer.lora_b["7"]
    assert pa.data_ptr() == ca[12:20].data_ptr() and pb.data_ptr() == cb[:, 12:20].data_ptr()
    with torch.no_grad():
        pb.mul_(3.0)
    with torch.inference_mode():
        assert torch.equal(layer(x, ids), unserved()(x, ids)) and layer._packing.cache[1] is ca
    for rows in (ids, torch.full((7,), 4)):  # the mixed path, then the one-adapter path
        twin = unserved()
        for m in (layer, twin):
            m(x, rows).square().sum().backward()
        assert layer._packing.cache is None
        for (name, p), q in zip(layer.adapter_params().items(), twin.adapter_params().values()):
            assert p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
        layer.zero_grad()
        with torch.inference_mode():
            layer(x, ids)  # serving again: the storage is shared again
        assert layer._packing.cache is not None
