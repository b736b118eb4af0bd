import struct

import pytest
import torch

from qlora_kit.formats import FormatError, atomic_dir, load_safetensors, read_header, save_safetensors, spec

pytestmark = pytest.mark.unit


def test_save_and_read_back_with_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors({"x": torch.arange(6, dtype=torch.uint8).reshape(3, 2)}, path)
    header = read_header(path)
    assert header["__metadata__"] == {"format": "pt", spec.METADATA_VERSION_KEY: spec.FORMAT_VERSION}
    assert torch.equal(load_safetensors(path)["x"], torch.arange(6, dtype=torch.uint8).reshape(3, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors({"x": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(FormatError, match=r"t\.safetensors: tensor x: offsets \[0, 400\) do not fit"):
        read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match="too short for a safetensors file"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="header length 1000000000000 exceeds the file size"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(FormatError, match="header is not valid JSON"):
        read_header(path)


def test_trailing_bytes_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors({"x": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(FormatError, match="body is 20 bytes but tensors end at 16"):
        read_header(path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("x")
    assert (out / "done").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
