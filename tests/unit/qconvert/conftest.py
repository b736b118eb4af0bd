import pytest

from qlora_kit.qconvert.convert import convert

from .tiny import write_tiny


@pytest.fixture
def tiny_src(tmp_path):
    return write_tiny(tmp_path / "src")


@pytest.fixture
def tiny_out(tiny_src, tmp_path):
    convert(str(tiny_src), tmp_path / "out", progress=False)
    return tmp_path / "out"
