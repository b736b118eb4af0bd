"""LoRA (Hu et al. 2021) over a frozen base linear, with several adapters resident at once.

For adapter a with rank r_a, alpha_a:

    y = base(x) + s_a * B_a (A_a (dropout_a(x))),   s_a = alpha_a / r_a   (or alpha_a / sqrt(r_a), rsLoRA)

A_a (r_a, in) starts Kaiming-uniform (a = sqrt(5), as nn.Linear and the LoRA paper's reference code)
and B_a (out, r_a) starts at zero, so a fresh adapter leaves the base model's output unchanged.

A batch selects the adapter per row: `adapter_ids` (B,) long, -1 = base model only; rows of other
ids get their own adapter, so one forward serves rows of different customers. The adapter branch
runs in the adapter weights' dtype (fp32 by default), is scaled there, then cast to the base
output's dtype and added (the order PEFT uses for 4-bit bases).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .nf4_linear import linear_forward

BASE_ONLY = -1


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

    def remove_adapter(self, adapter_id: int) -> None:
        if adapter_id in self.scales:
            del self.lora_a[str(adapter_id)], self.lora_b[str(adapter_id)]
            del self.scales[adapter_id], self.dropouts[adapter_id]

    def adapter_params(self, adapter_id: int | None = None) -> dict[str, nn.Parameter]:
        """The trainable tensors: {"lora_a.<id>": A, "lora_b.<id>": B} for one adapter or all."""
        ids = self.adapter_ids if adapter_id is None else [adapter_id]
        out = {}
        for i in ids:
            if i in self.scales:
                out[f"lora_a.{i}"] = self.lora_a[str(i)]
                out[f"lora_b.{i}"] = self.lora_b[str(i)]
        return out

    def _delta(self, x: torch.Tensor, adapter_id: int) -> torch.Tensor:
        a, b = self.lora_a[str(adapter_id)], self.lora_b[str(adapter_id)]
        x = F.dropout(x.to(a.dtype), self.dropouts[adapter_id], self.training)
        return (x @ a.t()) @ b.t() * self.scales[adapter_id]

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, in_features), adapter_ids (B,) long or None (= all rows base only) -> (B, T, out_features)."""
        y = linear_forward(self.base, x)
        if adapter_ids is None or not self.scales:
            return y
        present = [i for i in torch.unique(adapter_ids).tolist() if i in self.scales]
        if not present:
            return y
        if len(present) == 1 and bool((adapter_ids == present[0]).all()):
            return y + self._delta(x, present[0]).to(y.dtype)
        for i in present:
            rows = (adapter_ids == i).nonzero().squeeze(1)
            y = y.index_add(0, rows, self._delta(x[rows], i).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        ranks = {i: self.lora_a[str(i)].shape[0] for i in self.adapter_ids}
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters(rank)={ranks}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
