"""A frozen linear layer whose weight is stored as 4-bit NF4/FP4 codes (QLoRA, Dettmers et al. 2023).

    y = x W'^T + b,   W' = dequant(codes, absmax)  in the compute dtype (kernels.nf4_matmul)

The weight never trains. Backward gives only the input gradient, dL/dx = dL/dy W'. The matmul is the one
4-bit kernel, kernels.nf4_matmul (Triton fused dequant-GEMM on CUDA, the compiled C path on CPU): W' is decoded
inside it and not kept, except under gradient checkpointing (`share_decode`), where the recompute of a layer
keeps its W' for the backward that follows, so the two share one decode.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit import kernels
from qlora_kit.formats import NestedAbsmax, Packed4bit, QuantState


class NF4Linear(nn.Module):
    """Frozen 4-bit linear layer.

    Args:
        in_features, out_features: the weight's shape is (out_features, in_features).
        bias: whether a (frozen) bias is added; set by `load_bias` or `set_packed`'s caller.
        backend: None (CUDA -> Triton, CPU -> the compiled C kernels), "torch" or "triton" (kernels/_dispatch.py).

    The codes and quantization state are buffers (so `.to(device)` and state_dict see them); they are
    set by `set_packed`. Forward: (..., in_features) -> (..., out_features) in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._meta: tuple | None = None  # (quant_type, blocksize, shape, dtype, nested_blocksize)
        self._packed: Packed4bit | None = None  # built from the buffers once, again only after they move
        self.share_decode = False  # set by the trainer's checkpointing: recompute and backward share one decode

    def set_packed(self, packed: Packed4bit) -> None:
        """Take the codes and state of a quantized (out_features, in_features) weight."""
        self._packed = None
        s = packed.state
        if tuple(s.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear: packed weight {tuple(s.shape)} != ({self.out_features}, {self.in_features})")
        self.register_buffer("weight_data", packed.data)
        self.register_buffer("weight_absmax", s.absmax)
        self.register_buffer("weight_code", s.code)
        if s.nested is not None:
            self.register_buffer("weight_nested_absmax", s.nested.absmax)
            self.register_buffer("weight_nested_code", s.nested.code)
            self.register_buffer("weight_nested_offset", s.nested.offset)
        self._meta = (s.quant_type, s.blocksize, tuple(s.shape), s.dtype, s.nested.blocksize if s.nested else None)

    @property
    def packed(self) -> Packed4bit:
        """The weight as a Packed4bit on the buffers' current device (rebuilt only when .to() replaced them)."""
        if self._meta is None:
            raise RuntimeError("NF4Linear: no weight loaded (call set_packed)")
        if self._packed is not None and self._packed.data is self.weight_data and self._packed.state.absmax is self.weight_absmax:
            return self._packed
        quant_type, blocksize, shape, dtype, nested_bs = self._meta
        nested = None
        if nested_bs is not None:
            nested = NestedAbsmax(self.weight_nested_absmax, self.weight_nested_code, self.weight_nested_offset,
                                  nested_bs)
        state = QuantState(quant_type, blocksize, shape, dtype, self.weight_absmax, self.weight_code, nested)
        self._packed = Packed4bit(self.weight_data, state)
        return self._packed

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W' (out_features, in_features) in `dtype`."""
        return kernels.dequant(self.packed, dtype, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        save = self.share_decode and torch.is_grad_enabled()
        return kernels.nf4_matmul(x, self.packed, None if self.bias is None else self.bias.to(x.dtype), self.backend,
                                  save_decoded=save)

    def extra_repr(self) -> str:
        qt = self._meta[0] if self._meta else "unloaded"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {qt}"


def dense_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A frozen full-precision linear layer (the unquantized base of a LoRA layer)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.requires_grad_(False)
    return layer


def linear_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an NF4Linear or nn.Linear base in x's dtype."""
    if isinstance(layer, NF4Linear):
        return layer(x)
    return F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))
