"""FORMAT.md cannot drift: its worked example, codebook and config block are recomputed from the code."""
import json
import re

import bitsandbytes.functional as bnbf
import pytest

from qlora_kit.formats import quantization_config, spec
from tests.conftest import REPO
from tests.unit.formats.worked_example import render, worked_example, worked_example_weight

pytestmark = pytest.mark.unit
DOC = (REPO / "FORMAT.md").read_text()


def test_worked_example_block_equals_the_code():
    block = DOC.split("```json worked-example\n")[1].split("\n```")[0]
    assert block == render(worked_example())


def test_worked_example_bytes_are_bitsandbytes_bytes():
    q, st = bnbf.quantize_4bit(worked_example_weight(), blocksize=64, quant_type="nf4", compress_statistics=True)
    example = worked_example()
    assert bytes(q.flatten().tolist()).hex() == example["weight_hex"]
    assert st.absmax.tolist() == example["absmax_u8"]
    assert st.offset.item() == example["nested_offset"]


def test_nf4_table_in_doc_equals_spec():
    section = DOC.split("### 2.1 Codebooks")[1].split("FP4 (")[0]
    numbers = [float(x) for x in re.findall(r"\| (-?\d+\.\d+)", section)]
    assert numbers == list(spec.NF4_CODE)


def test_quantization_config_block_equals_the_code():
    block = DOC.split("## 4. config.json `quantization_config`")[1].split("```json\n")[1].split("\n```")[0]
    assert json.loads(block) == quantization_config()
