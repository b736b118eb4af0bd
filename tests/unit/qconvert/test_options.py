import pytest

from qlora_kit.formats import QloraKitError
from qlora_kit.qconvert.errors import InvalidOption
from qlora_kit.qconvert.options import ConvertConfig, parse_size

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                        ("1.5KB", 1500), ("1000", 1000), (42, 42)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "5XB", "0", "-1GB"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidOption, match="--max-shard-size"):
        parse_size(text)


def test_config_validates_each_field():
    with pytest.raises(InvalidOption, match="--quant-type 'int4'"):
        ConvertConfig(quant_type="int4")
    with pytest.raises(InvalidOption, match="--blocksize 100"):
        ConvertConfig(blocksize=100)
    with pytest.raises(InvalidOption, match="--compute-dtype 'float64'"):
        ConvertConfig(compute_dtype="float64")
    with pytest.raises(InvalidOption, match="--skip-modules entry 'mlp/down'"):
        ConvertConfig(skip_modules=("mlp/down",))
    assert issubclass(InvalidOption, QloraKitError)


def test_skip_modules_match_whole_dotted_parts():
    cfg = ConvertConfig(skip_modules=("mlp.down_proj", "o_proj"))
    assert cfg.skips("model.layers.0.mlp.down_proj.weight")
    assert cfg.skips("model.layers.3.self_attn.o_proj.weight")
    assert not cfg.skips("model.layers.0.mlp.up_proj.weight")
    assert not cfg.skips("model.layers.0.self_attn.xo_proj.weight")
