"""Every crafted file of tests/hostile/ (issue 13) through every CLI that reads that kind of file: each run ends
in exit code 2 and one line on stderr naming the file and the field (tests/hostile/expected.json), never a
traceback and never exit 0. The CLIs run in-process (click's CliRunner), in a watchdog thread so a file that is
wrongly accepted by `qserve serve` (which would then serve forever) fails the test instead of hanging it.
"""
import json
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_kit.qconvert.cli import main as qconvert
from qlora_kit.qserve.cli import main as qserve
from qlora_kit.trainer.cli import main as qtrain

pytestmark = pytest.mark.integration
HOSTILE = Path(__file__).resolve().parent.parent / "hostile"
EXPECTED = json.loads((HOSTILE / "expected.json").read_text())
KEY = "sk-hostile-test-key"


def _invoke(cli, args, timeout=120.0):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", CliRunner().invoke(cli, [str(a) for a in args])),
                         daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{args}: still running after {timeout} s (the bad file was accepted)"
    return box["r"]


@pytest.fixture(scope="module")
def tiny_chat(smollm2, tmp_path_factory):
    """A 2-layer hidden-64 model with SmolLM2's tokenizer: what qserve serve / qtrain need to get to the file."""
    from tests.unit.trainer._tiny import write_tiny_chat_model

    return write_tiny_chat_model(smollm2, tmp_path_factory.mktemp("tiny_chat") / "model")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    p = tmp_path_factory.mktemp("keys") / "keys.json"
    p.write_text(json.dumps({"keys": [{"key": KEY, "admin": True}]}))
    return p


def _folder(tmp: Path, files: dict[str, Path]) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    for name, src in files.items():
        shutil.copy(src, folder / name)
    return folder


def _runs(kind: str, path: Path, tmp: Path, tiny_chat: Path, keys: Path):
    """(label, cli, args, the file the line must name) for every CLI that reads this kind of file."""
    if kind == "safetensors":
        src = _folder(tmp, {"config.json": HOSTILE / "source" / "config.json", "model.safetensors": path})
        q = tmp / "q"
        q.mkdir()
        shutil.copy(HOSTILE / "quant_state" / "config.json", q / "config.json")
        shutil.copy(path, q / "model.safetensors")
        named = src / "model.safetensors"
        yield "convert", qconvert, ["convert", src, tmp / "out", "--quiet"], named
        yield "report", qconvert, ["report", src, "--json"], named
        for cmd in (["inspect", q], ["verify", q], ["dequantize", q, tmp / "deq", "--quiet"]):
            yield cmd[0], qconvert, cmd, q / "model.safetensors"
    elif kind == "config":
        src = _folder(tmp, {"config.json": path, "model.safetensors": HOSTILE / "source" / "model.safetensors"})
        yield "convert", qconvert, ["convert", src, tmp / "out", "--quiet"], src / "config.json"
        only = tmp / "serve"
        only.mkdir()
        shutil.copy(path, only / "config.json")
        yield "serve", qserve, ["serve", only, "--api-keys", keys], only / "config.json"
    elif kind == "quant_state":
        q = _folder(tmp, {"config.json": HOSTILE / "quant_state" / "config.json", "model.safetensors": path})
        for cmd in (["inspect", q], ["verify", q], ["dequantize", q, tmp / "deq", "--quiet"]):
            yield cmd[0], qconvert, cmd, q / "model.safetensors"
    elif kind == "adapter_config":
        adapter = tmp / "adapter"
        adapter.mkdir()
        shutil.copy(path, adapter / "adapter_config.json")
        shutil.copy(HOSTILE / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
        named = adapter / "adapter_config.json"
        yield "serve", qserve, ["serve", tiny_chat, "--api-keys", keys, "--adapter", f"x={adapter}"], named
        yield "ask", qtrain, ["ask", "--base", tiny_chat, "--adapter", adapter, "hi"], named
    elif kind == "keys":
        only = tmp / "serve"
        only.mkdir()
        shutil.copy(HOSTILE / "source" / "config.json", only / "config.json")
        yield "serve", qserve, ["serve", only, "--api-keys", path], path
    elif kind == "jsonl":
        yield "train", qtrain, ["train", "--base", tiny_chat, "--data", path, "--out", tmp / "out", "--no-progress"], path
    elif kind == "train_config":
        good = HOSTILE / "jsonl" / "second_line.jsonl"  # never read: the config is refused first
        yield "train", qtrain, ["train", "--config", path, "--base", tiny_chat, "--data", good, "--out", tmp / "out",
                                "--no-progress"], path


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_hostile_file(rel, tmp_path, tiny_chat, keys):
    path = HOSTILE / rel
    kind = rel.split("/")[0]
    runs = list(_runs(kind, path, tmp_path, tiny_chat, keys))
    assert runs, rel
    for label, cli, args, named in runs:
        r = _invoke(cli, args)
        lines = r.stderr.strip().splitlines()
        where = f"{rel} via {label}: exit {r.exit_code}\n{r.stderr}\n{r.stdout[-2000:]}"
        assert r.exit_code == 2 and len(lines) == 1, where
        assert "Traceback" not in r.output and lines[0].startswith("error:"), where
        assert str(named) in lines[0] and EXPECTED[rel] in lines[0], where
