"""vLLM quantization config `qlora_nf4` and its linear method: our 4-bit weights, our kernels.

vLLM builds every linear layer through `get_quant_method`; ours registers a placeholder `weight` (the
device anchor vLLM's LoRA layers look for) and remembers the layer's partition geometry. The `qlora_nf4`
model loader (_loader.py) fills `layer.qlora_parts` with this rank's shard of each logical weight (q, k, v
or gate, up); after loading they are glued into one Packed4bit and `apply` is one `kernels.nf4_matmul`
(Triton on CUDA; on CPU the fused decode-and-multiply of kernels/cpu, exact with the torch twin).

With QLORA_KIT_VLLM_DEQUANTIZE=1 (set by `qserve serve --backend vllm --dequantize-base`) each layer is
decoded once after loading, by `kernels.dequant`, and kept dense, at 4x the weight memory (the native backend's
ServeConfig.dequantize_base). It is not a speed-up everywhere: on the AVX2-only CPU of bench/results/vllm.md the
dense bf16 GEMMs (emulated there) ran at 0.44-0.62x the 4-bit path's tokens/s.
"""
import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from qlora_kit.formats import Packed4bit
from qlora_kit.kernels import MIN_CAPABILITY, dequant, nf4_matmul

from . import NAME
from .errors import CheckpointMismatch
from .shards import concat_rows

_ACT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _refuse_default_loader(param, *args, **kwargs):
    raise CheckpointMismatch(f"quantization={NAME!r} weights are read by the {NAME!r} model loader: "
                             f"start vLLM with --load-format {NAME}")


class QloraNF4Config(QuantizationConfig):
    """The `quantization_config` transformers + bitsandbytes write for load_in_4bit (FORMAT.md §4)."""

    def __init__(self, quant_type: str = "nf4", double_quant: bool = True, skip_modules: list[str] | None = None):
        super().__init__()
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.skip_modules = list(skip_modules or [])
        self.dequantize = os.environ.get("QLORA_KIT_VLLM_DEQUANTIZE") == "1"

    def __repr__(self) -> str:
        return f"QloraNF4Config(quant_type={self.quant_type}, double_quant={self.double_quant})"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return list(_ACT_DTYPES)

    @classmethod
    def get_min_capability(cls) -> int:
        return MIN_CAPABILITY  # bf16 tensor-core dots and cp.async pipelining need sm_80 (kernels/_device.py)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config travels inside config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QloraNF4Config":
        method = config.get("quant_method")
        four_bit = config.get("load_in_4bit") or config.get("_load_in_4bit")
        if method != "bitsandbytes" or not four_bit:
            raise CheckpointMismatch(f"quantization_config: quant_method={method!r}, load_in_4bit={four_bit!r}; "
                                     f"{NAME} reads 4-bit bitsandbytes-layout checkpoints (qconvert convert)")
        quant_type = config.get("bnb_4bit_quant_type", "nf4")
        if quant_type not in ("nf4", "fp4"):
            raise CheckpointMismatch(f"quantization_config.bnb_4bit_quant_type={quant_type!r}: use nf4 or fp4")
        return cls(quant_type, bool(config.get("bnb_4bit_use_double_quant", False)),
                   config.get("llm_int8_skip_modules"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim 4-bit bitsandbytes checkpoints when asked for by name, or when no other plugin serves them."""
        four_bit = hf_quant_cfg.get("load_in_4bit") or hf_quant_cfg.get("_load_in_4bit")
        if hf_quant_cfg.get("quant_method") != "bitsandbytes" or not four_bit:
            return None
        if user_quant == NAME or (user_quant is None and "bitsandbytes" not in QUANTIZATION_METHODS):
            return NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        if any(skip in prefix.split(".") or prefix.endswith(skip) for skip in self.skip_modules):
            return UnquantizedLinearMethod()
        return QloraNF4LinearMethod(self)


class QloraNF4LinearMethod(LinearMethodBase):
    """y = x @ W'^T (+ bias) with W' decoded from 4 bits inside `kernels.nf4_matmul`."""

    def __init__(self, config: QloraNF4Config):
        self.config = config

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        # Placeholder on the target device; it becomes the packed codes once loaded.
        weight = torch.nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, {**extra_weight_attrs, "weight_loader": _refuse_default_loader})
        layer.qlora_geometry = (input_size_per_partition, tuple(output_partition_sizes), input_size, output_size)
        layer.qlora_dtype = params_dtype
        layer.qlora_parts = {}
        layer.qlora_packed = layer.qlora_dense = None

    def process_weights_after_loading(self, layer) -> None:
        sizes = layer.qlora_geometry[1]
        where = getattr(layer, "prefix", type(layer).__name__)
        missing = [i for i in range(len(sizes)) if i not in layer.qlora_parts]
        if missing:
            raise CheckpointMismatch(f"{where}: no 4-bit weight in the checkpoint for part(s) {missing} of "
                                     f"{len(sizes)}; is it a qconvert / bitsandbytes 4-bit checkpoint?")
        packed: Packed4bit = concat_rows([layer.qlora_parts[i] for i in range(len(sizes))], where)
        want = (sum(sizes), layer.qlora_geometry[0])
        if tuple(packed.state.shape) != want:
            raise CheckpointMismatch(f"{where}: 4-bit weight shard is {packed.state.shape}, vLLM expects {want}")
        layer.qlora_packed, layer.qlora_parts = packed, {}
        if self.config.dequantize:
            layer.qlora_dense = dequant(packed, layer.qlora_dtype)
            layer.weight = torch.nn.Parameter(layer.qlora_dense, requires_grad=False)
        else:
            layer.weight = torch.nn.Parameter(packed.data, requires_grad=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.qlora_dense is not None:
            return torch.nn.functional.linear(x, layer.qlora_dense, bias)
        return nf4_matmul(x, layer.qlora_packed, bias)

    def dequantize_weight(self, layer) -> torch.Tensor:
        return dequant(layer.qlora_packed, layer.qlora_packed.state.dtype)
