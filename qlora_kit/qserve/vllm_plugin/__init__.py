"""vLLM plugin: serve qlora-kit / bitsandbytes 4-bit checkpoints on current vLLM with our kernels.

Registered through the entry point group `vllm.general_plugins` (pyproject.toml), so every vLLM process
calls `register()`; it adds the quantization config and the model loader named `qlora_nf4`:

    python -m vllm.entrypoints.openai.api_server --model CKPT --quantization qlora_nf4 --load-format qlora_nf4

This package is the only place in qlora-kit that imports vLLM, and only inside `register()` and the private
modules it loads; `shards` (the tensor-parallel cutting rules) needs torch only.
"""
NAME = "qlora_nf4"
_registered = False


def register() -> None:
    """Add `qlora_nf4` to vLLM's quantization configs and model loaders (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from ._loader import QloraNF4Loader
    from ._quant import QloraNF4Config

    register_quantization_config(NAME)(QloraNF4Config)
    register_model_loader(NAME)(QloraNF4Loader)
    _registered = True


__all__ = ["NAME", "register"]
