"""qlora-kit: 4-bit NormalFloat (NF4) LLMs, the method of the QLoRA paper (Dettmers et al., 2023).

One import namespace, `qlora_kit`, so that nothing collides with other distributions (Hugging Face's
`kernels`, Coqui's `trainer`). Its subpackages are the layers of DESIGN.md, each importing only those below it:
formats (what the bytes mean) <- kernels (Triton + torch twins) <- models (one decoder) <- qconvert / trainer /
qserve (the three CLIs, which share _cli: their error boundary and options generated from config dataclasses).
Importing this package loads nothing heavy; import a subpackage for its API.
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
