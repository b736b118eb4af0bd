"""--cpu-adapter-budget sizes: units, and one clear error naming the flag."""
import pytest

from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.store import parse_bytes

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,value", [("1048576", 2**20), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                        ("64k", 64000), ("1.5KiB", 1536), (" 3 gib ", 3 * 2**30), ("7b", 7)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text,needle", [("", "expected a byte count"), ("12 parsecs", "expected a byte count"),
                                         ("-5MB", "expected a byte count"), ("0", "must be a whole number of bytes >= 1"),
                                         ("1.3B", "must be a whole number of bytes >= 1")])
def test_parse_bytes_refuses(text, needle):
    with pytest.raises(ValueError, match=f"cpu_adapter_budget={text!r}: {needle}"):
        parse_bytes(text)


def test_serve_config_checks_the_budget_and_the_store(tmp_path):
    assert ServeConfig(str(tmp_path), cpu_adapter_budget="1MiB").cpu_budget_bytes == 2**20
    with pytest.raises(ValueError, match="cpu_adapter_budget='lots'"):
        ServeConfig(str(tmp_path), cpu_adapter_budget="lots")
    with pytest.raises(ValueError, match="adapter_store='.*nowhere': not an existing folder \\(flag --adapter-store\\)"):
        ServeConfig(str(tmp_path), adapter_store=str(tmp_path / "nowhere"))
