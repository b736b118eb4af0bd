"""The loss-curve PNG: matplotlib when installed, else a small built-in rasterizer (axes, train and eval
lines, no text) written as an 8-bit RGB PNG with zlib, so the file always exists and is honest about
the curve's shape. The figures themselves are in metrics.jsonl.
"""
import struct
import zlib
from pathlib import Path

from qlora_kit.formats import atomic_file

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False

W, H, MARGIN = 640, 400, 40
TRAIN_RGB, EVAL_RGB, AXIS_RGB = (31, 119, 180), (214, 39, 40), (0, 0, 0)


def write_loss_curve(path: Path, train: tuple[list, list], evals: tuple[list, list]) -> str:
    """Write the PNG; returns 'matplotlib' or 'builtin' (the latter has no axis labels)."""
    with atomic_file(path) as tmp:
        if HAS_MATPLOTLIB:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            ax.plot(*train, label="train loss")
            if evals[0]:
                ax.plot(*evals, "o-", label="eval loss")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()
            fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)
            return "matplotlib"
        tmp.write_bytes(_raster_png(train, evals))
        return "builtin"


def _raster_png(train, evals) -> bytes:
    px = [[(255, 255, 255)] * W for _ in range(H)]
    xs = list(train[0]) + list(evals[0])
    ys = list(train[1]) + list(evals[1])
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    y0, y1 = (min(0.0, min(ys)), max(ys)) if ys else (0, 1)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x, y):
        return (MARGIN + round((x - x0) / (x1 - x0) * (W - 2 * MARGIN)),
                H - MARGIN - round((y - y0) / (y1 - y0) * (H - 2 * MARGIN)))

    def line(a, b, rgb):
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for i in range(n + 1):
            x = a[0] + (b[0] - a[0]) * i // n
            y = a[1] + (b[1] - a[1]) * i // n
            for dy in (0, 1):
                if 0 <= x < W and 0 <= y + dy < H:
                    px[y + dy][x] = rgb

    line((MARGIN, H - MARGIN), (W - MARGIN, H - MARGIN), AXIS_RGB)
    line((MARGIN, MARGIN), (MARGIN, H - MARGIN), AXIS_RGB)
    for (sx, sy), rgb in ((train, TRAIN_RGB), (evals, EVAL_RGB)):
        pts = [to_px(x, y) for x, y in zip(sx, sy)]
        for a, b in zip(pts, pts[1:] or pts):
            line(a, b, rgb)
    raw = b"".join(b"\x00" + bytes(c for p in row for c in p) for row in px)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
