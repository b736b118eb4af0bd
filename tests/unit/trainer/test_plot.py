"""trainer/plot.py: the loss curve is a valid PNG with or without matplotlib."""
import struct
import zlib

import pytest

from qlora_kit.trainer import plot

pytestmark = pytest.mark.unit


def test_builtin_png_is_valid_and_draws_the_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "HAS_MATPLOTLIB", False)
    path = tmp_path / "loss.png"
    assert plot.write_loss_curve(path, ([1, 2, 3], [4.0, 2.0, 1.0]), ([3], [1.5])) == "builtin"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (plot.W, plot.H)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)
    assert bytes(plot.TRAIN_RGB) in raw and bytes(plot.EVAL_RGB) in raw


def test_empty_series_still_writes_a_png(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "HAS_MATPLOTLIB", False)
    plot.write_loss_curve(tmp_path / "loss.png", ([], []), ([], []))
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
