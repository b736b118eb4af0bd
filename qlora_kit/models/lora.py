"""LoRA (Hu et al. 2021) over a frozen base linear, with several adapters resident at once.

For adapter a with rank r_a, alpha_a:

    y = base(x) + s_a * B_a (A_a (dropout_a(x))),   s_a = alpha_a / r_a   (or alpha_a / sqrt(r_a), rsLoRA)

A_a (r_a, in) starts Kaiming-uniform (a = sqrt(5), as nn.Linear and the LoRA paper's reference code)
and B_a (out, r_a) starts at zero, so a fresh adapter leaves the base model's output unchanged.

A batch selects the adapter per row: `adapter_ids` (B,) long, -1 = base model only; rows of other
ids get their own adapter, so one forward serves rows of different customers.

The adapter branch is kernels.lora / lora_multi with the scale applied to the rank-r intermediate:
y = base(x) + (s (x A^T)) B^T. A and B stay Parameters in their own dtype (fp32 masters by default) and go to
the kernels as they are: Triton (CUDA) computes in x's dtype, the CPU path in theirs (see kernels/cpu/lora.py).
- All rows on one adapter: kernels.lora.
- Rows of several adapters: one kernels.lora_multi call for all rows, whatever the number of adapters.
  The layer keeps its adapters packed, ordered by (rank, id): A (sum r_i, in), B (out, sum r_i), offsets,
  scales and an id -> packed index table. Without grad (serving) the packed A and B are made once per packing and
  become the Parameters' storage: each A_i, B_i is a view of its slice (the same Parameter objects, `.data`
  rebound), so an in-place write (write_adapter, a server reusing a slot; an optimizer step; load_state_dict)
  lands in the packed pair, which is current without a check per forward; adding or removing an adapter, or
  .to() / .half(), repacks. With grad (train-many) the packed pair is a differentiable concatenation of the
  Parameters, made each forward; a forward with grad first gives shared Parameters storage of their own back
  (contiguous copies, as add_adapter makes them), so training computes exactly as on a layer that never served
  (a B_i view is strided, and a BLAS product may round differently on it). A mixed forward without grad between
  a backward and its optimizer step would hand that step strided B_i (trainer/optim's AdamW refuses them);
  train-many evaluates one adapter at a time, which never packs.
- Layers that share an input (q/k/v, gate/up) serve a mixed batch through forward_group: one
  kernels.lora_multi_group call for the group when the layers carry the same adapters, ranks and scales.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit import kernels

from .nf4_linear import linear_forward

BASE_ONLY = -1


@dataclass
class _Packing:
    """A layer's adapters in packed order: ids (sorted by rank, then id), offsets (n + 1,), scales (n,) fp32,
    dropouts (n,), and table (max id + 3,) mapping id + 1 -> packed index (-1: not in this layer; ids above
    the largest are clamped to the last entry, -1)."""

    ids: tuple[int, ...]
    offsets: torch.Tensor
    scales: torch.Tensor
    dropouts: torch.Tensor
    table: torch.Tensor
    params: tuple[list[nn.Parameter], list[nn.Parameter]]  # the A_i and the B_i in packed order
    signature: tuple  # (ids, ranks, scales) as host values: equal signatures mean equal offsets, scales and table
    cache: tuple | None = None  # (params, A, B): A, B packed without grad, the storage of the Parameters `params`

    def __deepcopy__(self, memo) -> None:
        return None  # a copied layer's Parameters are clones, no longer views of a packed pair: it repacks


class _Rows:
    """What one forward's adapter_ids say, worked out once and shared by every layer (the same tensor reaches all):
    the single id every row carries (or None), and each packing's per-row packed indices."""

    _last: tuple = (None, -1, None)

    @classmethod
    def of(cls, ids: torch.Tensor) -> "_Rows":
        last, version, rows = cls._last
        now = -1 if ids.is_inference() else ids._version  # inference tensors have no version counter
        if last is not ids or version != now:
            rows = cls(ids)
            cls._last = (ids, now, rows)
        return rows

    def __init__(self, ids: torch.Tensor):
        lo, hi = torch.aminmax(ids) if ids.numel() else (torch.tensor(-1), torch.tensor(-1))
        lo, hi = int(lo), int(hi)
        self.ids, self.uniform, self.local = ids, lo if lo == hi else None, {}

    def packed_index(self, packing: _Packing) -> torch.Tensor:
        got = self.local.get(packing.ids)
        if got is None:
            table = packing.table.to(self.ids.device)
            got = table[(self.ids + 1).clamp(0, table.numel() - 1)]
            self.local[packing.ids] = got
        return got

    def token_index(self, packing: _Packing, lead: torch.Size) -> torch.Tensor:
        """packed_index per token of x's leading shape `lead`, contiguous (every layer of the forward shares it)."""
        got = self.local.get((packing.ids, lead))
        if got is None:
            local = self.packed_index(packing)
            got = local.view(local.shape + (1,) * (len(lead) - local.dim())).expand(lead).contiguous()
            self.local[(packing.ids, lead)] = got
        return got


class LoraLinear(nn.Module):
    """A frozen base linear (NF4Linear or nn.Linear) plus LoRA adapters indexed by integer id.

    Args:
        base: the frozen layer; its weight is (out_features, in_features).
        in_features, out_features: the base's shape (known before the base is materialized).

    Adapter weights live in `lora_a[str(id)]` (r, in) and `lora_b[str(id)]` (out, r).
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self.scales: dict[int, float] = {}
        self.dropouts: dict[int, float] = {}
        self._packing: _Packing | None = None

    @property
    def adapter_ids(self) -> list[int]:
        return sorted(self.scales)

    def add_adapter(self, adapter_id: int, rank: int, scale: float, dropout: float = 0.0,
                    dtype: torch.dtype = torch.float32, device=None) -> None:
        """Create adapter `adapter_id` with Kaiming-uniform A and zero B."""
        if adapter_id < 0:
            raise ValueError(f"adapter_id={adapter_id}: must be >= 0 (-1 means base only)")
        if rank < 1:
            raise ValueError(f"rank={rank}: must be >= 1")
        device = device if device is not None else _device_of(self.base)
        a = torch.empty(rank, self.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_a[str(adapter_id)] = nn.Parameter(a)
        self.lora_b[str(adapter_id)] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.scales[adapter_id] = float(scale)
        self.dropouts[adapter_id] = float(dropout)
        self._packing = None

    def remove_adapter(self, adapter_id: int) -> None:
        if adapter_id in self.scales:
            del self.lora_a[str(adapter_id)], self.lora_b[str(adapter_id)]
            del self.scales[adapter_id], self.dropouts[adapter_id]
            self._packing = None

    def write_adapter(self, adapter_id: int, a: torch.Tensor, b: torch.Tensor, scale: float,
                      dropout: float = 0.0) -> bool:
        """Overwrite adapter `adapter_id` in place with A (r, in) and B (out, r) of its own rank and dtype (a
        server reusing a slot): its Parameters stay, and a serving packing keeps its layout, with only this
        adapter's rows of the packed A, columns of the packed B, scale and dropout rewritten (the other adapters
        of the layer are not re-packed).

        Returns:
            False, changing nothing, when the layer has no adapter `adapter_id` or its A/B shapes or dtype differ
            from a/b's (then remove it and add a fresh one); True once written.
        """
        key = str(adapter_id)
        if adapter_id not in self.scales:
            return False
        pa, pb = self.lora_a[key], self.lora_b[key]
        if pa.shape != a.shape or pb.shape != b.shape or pa.dtype != a.dtype or pb.dtype != b.dtype:
            return False
        packing = self._packing
        with torch.no_grad():  # with a serving packing, pa and pb are views of its packed A/B: written there too
            pa.copy_(a)
            pb.copy_(b)
        if packing is not None:  # its tensors are inference tensors when a serving forward made them
            with torch.inference_mode():
                j = packing.ids.index(adapter_id)
                packing.scales[j] = float(scale)
                packing.dropouts[j] = float(dropout)
                ids, ranks, scales = packing.signature  # forward_group compares layers by it: keep it true
                packing.signature = (ids, ranks, scales[:j] + (float(scale),) + scales[j + 1:])
        self.scales[adapter_id], self.dropouts[adapter_id] = float(scale), float(dropout)
        return True

    def adapter_params(self, adapter_id: int | None = None) -> dict[str, nn.Parameter]:
        """The trainable tensors: {"lora_a.<id>": A, "lora_b.<id>": B} for one adapter or all."""
        ids = self.adapter_ids if adapter_id is None else [adapter_id]
        out = {}
        for i in ids:
            if i in self.scales:
                out[f"lora_a.{i}"] = self.lora_a[str(i)]
                out[f"lora_b.{i}"] = self.lora_b[str(i)]
        return out

    def _apply(self, fn, recurse=True):
        self._packing = None  # .to(device) / .half(): the packing is rebuilt where the adapters now live
        return super()._apply(fn, recurse)

    def _packed(self) -> _Packing:
        if self._packing is None:
            ids = tuple(sorted(self.scales, key=lambda i: (self.lora_a[str(i)].shape[0], i)))
            dev = self.lora_a[str(ids[0])].device
            ranks = [self.lora_a[str(i)].shape[0] for i in ids]
            table = torch.full((max(ids) + 3,), -1, dtype=torch.int64)  # the last entry: every id above the largest
            table[torch.tensor(ids) + 1] = torch.arange(len(ids))
            scales = [self.scales[i] for i in ids]
            self._packing = _Packing(ids, torch.tensor([0] + ranks, device=dev).cumsum(0),
                                     torch.tensor(scales, dtype=torch.float32, device=dev),
                                     torch.tensor([self.dropouts[i] for i in ids], device=dev), table.to(dev),
                                     ([self.lora_a[str(i)] for i in ids], [self.lora_b[str(i)] for i in ids]),
                                     (ids, tuple(ranks), tuple(scales)))
        return self._packing

    def _packed_weights(self, packing: _Packing) -> tuple[torch.Tensor, torch.Tensor]:
        """A (sum r_i, in) and B (out, sum r_i) in packed order."""
        a, b = packing.params
        if _recorded(packing, a + b):
            return torch.cat(a), _cat_columns(b)
        if packing.cache is None:  # then the Parameters' storage (module docstring): current by construction
            packing.cache = _share_storage(a, b)
        return packing.cache[1], packing.cache[2]

    def _dropout(self, x: torch.Tensor, packing: _Packing, local: torch.Tensor) -> torch.Tensor:
        """Inverted dropout of the LoRA input with each row's adapter's probability (0 for rows without one)."""
        if not self.training or max(self.dropouts.values()) == 0:
            return x
        p = torch.where(local >= 0, packing.dropouts[local.clamp(min=0)], 0.0)
        p = p.view(p.shape + (1,) * (x.dim() - p.dim()))
        keep = torch.rand(x.shape, device=x.device) >= p
        return x * torch.where(keep, 1 / (1 - p), 0.0).to(x.dtype)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, in_features), adapter_ids (B,) long or None (= all rows base only) -> (B, T, out_features)."""
        y = linear_forward(self.base, x)
        if adapter_ids is None or not self.scales:
            return y
        rows = _Rows.of(adapter_ids)
        if rows.uniform is not None:
            i = rows.uniform
            if i not in self.scales:
                return y
            a, b = self.lora_a[str(i)], self.lora_b[str(i)]
            _recorded(self._packing, (a, b))
            xd = F.dropout(x, self.dropouts[i], self.training)
            return kernels.lora(y, xd, a, b, self.scales[i])
        packing = self._packed()
        local = rows.packed_index(packing)  # (B,) packed index per row, -1 = none
        ids = rows.token_index(packing, x.shape[:-1])
        a, b = self._packed_weights(packing)
        return kernels.lora_multi(y, self._dropout(x, packing, local), ids, a, b, packing.offsets, packing.scales,
                                  reuse_base=True)  # y is this call's own

    def _serves_mixed(self, rows: "_Rows") -> bool:
        """True when forward would run kernels.lora_multi without dropout for these rows (the caller: no autograd)."""
        return bool(self.scales) and rows.uniform is None and not (self.training and max(self.dropouts.values()) > 0)

    def extra_repr(self) -> str:
        ranks = {i: self.lora_a[str(i)].shape[0] for i in self.adapter_ids}
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters(rank)={ranks}"


def _share_storage(a: list[nn.Parameter], b: list[nn.Parameter]) -> tuple:
    """(params, A, B): A (sum r_i, in) and B (out, sum r_i) packed from the A_i, B_i, which then become views of
    their slices (rows [o_i, o_{i+1}) of A, those columns of B; Parameter.data rebound: the same objects, values
    and grad flags). Made outside inference mode, so later in-place writes to the Parameters are allowed."""
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) turns grad on: no_grad inside it
        ca, cb = torch.cat(a), _cat_columns(b)
        lo = 0
        for pa, pb in zip(a, b):
            hi = lo + pa.shape[0]
            pa.data, pb.data = ca[lo:hi], cb[:, lo:hi]
            lo = hi
    return (a, b), ca, cb


def _recorded(packing: _Packing | None, params) -> bool:
    """Whether autograd records ops on `params` (Parameters of this layer); if so and they are a serving packing's
    views, they first get storage of their own back (_release), so autograd never reads the packed pair."""
    recorded = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if recorded and packing is not None and packing.cache is not None:
        _release(packing)
    return recorded


def _release(packing: _Packing) -> None:
    """Undo _share_storage before autograd reads the Parameters: each gets storage of its own back (a contiguous
    copy, as add_adapter makes it) and the packed pair is dropped."""
    with torch.no_grad():
        for p in (*packing.params[0], *packing.params[1]):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    packing.cache = None


def _cat_columns(b: list[torch.Tensor]) -> torch.Tensor:
    """B (out, sum r_i). On CPU it is the transpose of a contiguous (sum r_i, out), so kernels/cpu/lora.py takes an
    adapter's B as contiguous rows; CUDA's kernel reads the contiguous (out, sum r_i)."""
    if b[0].is_cuda:
        return torch.cat(b, dim=1)
    return torch.cat([t.t() for t in b]).t()


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def forward_group(layers: tuple[LoraLinear, ...], x: torch.Tensor, adapter_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """[layer(x, adapter_ids) for layer in layers] for layers that take the same input (q/k/v; gate/up), equal to
    those calls bit for bit.

    Serving a mixed batch (rows of several adapters, no autograd, no dropout), layers that carry the same adapters
    with the same ranks and scales make one kernels.lora_multi_group call, which on CPU is one kernels/cpu/lora.c call
    for the group, writing into the base outputs; otherwise (training, one adapter for every row, adapters that
    differ between the layers) each layer runs its own forward. The group call bypasses each layer's forward, so
    forward hooks registered on the layers do not fire on that path.
    """
    if adapter_ids is None or torch.is_grad_enabled():
        return [layer(x, adapter_ids) for layer in layers]
    rows = _Rows.of(adapter_ids)
    if not all(layer._serves_mixed(rows) for layer in layers):
        return [layer(x, adapter_ids) for layer in layers]
    packings = [layer._packed() for layer in layers]
    first = packings[0]
    if any(p.signature != first.signature for p in packings[1:]):
        return [layer(x, adapter_ids) for layer in layers]
    ids = rows.token_index(first, x.shape[:-1])
    a, b = zip(*[layer._packed_weights(p) for layer, p in zip(layers, packings)])
    ys = [linear_forward(layer.base, x) for layer in layers]
    return kernels.lora_multi_group(ys, x, ids, a, b, first.offsets, first.scales, reuse_base=True)
