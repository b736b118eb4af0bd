import json
import struct

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import save

from qlora_kit.formats import spec

pytestmark = pytest.mark.unit


def test_nf4_table_is_derived_from_normal_quantiles():
    assert torch.equal(spec.derive_nf4(), spec.code_table("nf4"))


@pytest.mark.parametrize("quant_type", spec.QUANT_TYPES)
def test_codebooks_equal_bitsandbytes(quant_type):
    assert torch.equal(spec.code_table(quant_type), bnbf.get_4bit_type(quant_type, device="cpu"))


def test_nf4_table_equals_bitsandbytes_create_normal_map():
    levels = bnbf.create_normal_map()
    nonzero_then_zero = torch.cat([levels[levels != 0], torch.zeros(1)]).sort().values
    assert torch.equal(nonzero_then_zero, spec.code_table("nf4"))


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(spec.dynamic_map(), bnbf.create_dynamic_map(signed=True))


def test_blocksizes_are_powers_of_two_64_to_4096():
    assert spec.BLOCKSIZES == (64, 128, 256, 512, 1024, 2048, 4096)


@pytest.mark.parametrize("name", sorted(spec.ST_DTYPES))
def test_safetensors_dtype_table_matches_what_safetensors_writes(name):
    """safetensors itself is the oracle: the name it writes for each torch dtype, and the bytes it spans."""
    blob = save({"t": torch.zeros(3, 5, dtype=spec.ST_DTYPES[name])})
    (hlen,) = struct.unpack("<Q", blob[:8])
    entry = json.loads(blob[8:8 + hlen])["t"]
    start, end = entry["data_offsets"]
    assert entry["dtype"] == name == spec.ST_NAMES[spec.ST_DTYPES[name]]
    assert end - start == spec.st_nbytes(name, [3, 5]) == len(blob) - 8 - hlen
