"""trainer/plot.py: the loss curve is a real matplotlib PNG with axes and labels, or a clear skip without it."""
import struct

import matplotlib.image
import numpy as np
import pytest

from qlora_kit.trainer import plot

pytestmark = pytest.mark.unit


def test_png_has_the_stated_size_and_both_curves(tmp_path):
    path = tmp_path / "loss.png"
    assert plot.write_loss_curve(path, ([1, 2, 3, 4], [4.0, 2.5, 1.8, 1.2]), ([2, 4], [2.9, 1.9]))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (round(plot.SIZE_IN[0] * plot.DPI), round(plot.SIZE_IN[1] * plot.DPI))
    pixels = matplotlib.image.imread(path)[..., :3]  # decoded back by matplotlib's own PNG reader
    assert pixels.shape == (height, width, 3)
    # tab:blue (train) and tab:red (eval) are both drawn; the rest is mostly white background
    blue, red = np.array([31, 119, 180]) / 255, np.array([214, 39, 40]) / 255
    assert (np.abs(pixels - blue).sum(-1) < 0.05).sum() > 50
    assert (np.abs(pixels - red).sum(-1) < 0.05).sum() > 20
    assert 0.5 < (pixels.min(-1) > 0.95).mean() < 0.99


def test_labels_are_drawn(tmp_path, monkeypatch):
    """The axes carry text: the figure's axis labels and title are set (read back from the Figure)."""
    seen = {}
    real = plot.Figure

    def spy(*a, **k):
        seen["fig"] = real(*a, **k)
        return seen["fig"]

    monkeypatch.setattr(plot, "Figure", spy)
    plot.write_loss_curve(tmp_path / "loss.png", ([1, 2], [3.0, 2.0]), ([2], [2.5]))
    ax = seen["fig"].axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel().startswith("loss")
    assert ax.get_title() == "loss (last: train 2.0000, eval 2.5000)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss"]


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "HAS_MATPLOTLIB", False)
    assert plot.write_loss_curve(tmp_path / "loss.png", ([1], [2.0]), ([], [])) is False
    assert not (tmp_path / "loss.png").exists()
    assert "pip install 'qlora-kit[plot]'" in plot.SKIPPED
