"""Shared fixtures. The Triton interpreter is switched on before anything imports triton, so the
Triton kernels run on CPU tensors when a test forces backend="triton"."""
import os

if not os.environ.get("QLORA_KIT_NO_INTERPRET"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = Path(os.environ.get("QLORA_KIT_SMOLLM2", REPO / ".cache" / "smollm2-135m-instruct"))


def requires_cuda(n: int = 1):
    """The one skip for GPU tests: skip unless at least `n` CUDA devices are visible."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(have < n, reason=f"needs {n} CUDA device(s), found {have}")


def linked_copy(src: Path, dst: Path) -> Path:
    """`src` under another folder name at no copying cost: every file hard-linked (for a test that shares a
    session checkpoint but needs its own name; writes there replace files atomically, so `src` stays intact)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The bundled SmolLM2-135M-Instruct bf16 folder, built once into the gitignored .cache/."""
    from tests.fixtures.smollm2 import build

    return build(SMOLLM2_DIR)


@pytest.fixture(scope="session")
def smollm2_nf4(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 converted once per session by `qconvert convert` (NF4, double quant): read-only for the tests that
    share it; a test that needs its own folder name takes a linked_copy, one that writes beside it converts its own."""
    from qlora_kit.qconvert.convert import convert

    out = tmp_path_factory.mktemp("smollm2_nf4") / "smollm2-nf4"
    convert(str(smollm2), out, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_bnb_nf4(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 quantized by transformers + bitsandbytes themselves (NF4, double quant, blocksize 64)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("bnb") / "smollm2-bnb-nf4"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model.save_pretrained(out)
    return out
