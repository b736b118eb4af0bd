"""Issue 13, files: what qconvert let through (items 8, 10, 12-15), each through the real CLI or the library
function it calls, asserting the exit code or error and its message."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qlora_kit.formats.io import OWNER_FILE, atomic_dir, clean_stale_temps
from qlora_kit.qconvert.cli import main
from qlora_kit.formats import ShardWriter

from .tiny import CONFIG, tiny_state, write_tiny

pytestmark = pytest.mark.unit


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_item8_overlapping_offsets_no_longer_convert_to_identical_weights(tmp_path):
    """Two weights sharing bytes converted to two identical outputs; safetensors itself refuses the file."""
    src = write_tiny(tmp_path / "src")
    path = src / "model.safetensors"
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hlen])
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    header[v]["data_offsets"] = header[k]["data_offsets"]  # v aliases k's bytes; v's own bytes become a hole
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + hlen:])
    with pytest.raises(Exception) as oracle:  # safetensors' own reader is the oracle: it refuses the file too
        load_file(str(path))
    assert "offset" in str(oracle.value).lower() or "metadata" in str(oracle.value).lower()
    _one_error(_run("convert", src, tmp_path / "out", "--quiet"), 2, str(path), "data_offsets", "overlaps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.pop("hidden_size"), "hidden_size is missing"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads is 0"),
    (lambda c: c.update(head_dim=8), "k_proj.weight: shape [32, 64]"),  # 2 kv heads x 8 = 16 rows, not 32
])
def test_item10_configs_the_loader_cannot_use_are_refused_at_convert(tmp_path, edit, needle):
    cfg = dict(CONFIG)
    edit(cfg)
    src = write_tiny(tmp_path / "src", config=cfg)
    _one_error(_run("convert", src, tmp_path / "out", "--quiet"), 2, needle)


def test_item10_wrong_shaped_q_proj_is_refused(tmp_path):
    state = tiny_state()
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(48, 64, dtype=torch.bfloat16)
    src = write_tiny(tmp_path / "src", state=state)
    _one_error(_run("convert", src, tmp_path / "out", "--quiet"), 2, "model.layers.1.self_attn.q_proj.weight",
               "shape [48, 64]", "implies [64, 64]")


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_item12_shard_index_paths_are_confined(tmp_path, target):
    src = write_tiny(tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    save_file(state, str(src / "model-00001-of-00001.safetensors"))
    weight_map = dict.fromkeys(state, "model-00001-of-00001.safetensors")
    weight_map["model.norm.weight"] = target
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _one_error(_run("convert", src, tmp_path / "out", "--quiet"), 2, "model.safetensors.index.json",
               "weight_map['model.norm.weight']", "must be a file name inside")


def test_item9_index_weight_map_list(tmp_path):
    src = write_tiny(tmp_path / "src")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    _one_error(_run("convert", src, tmp_path / "out", "--quiet"), 2, "weight_map must be a non-empty object")


def test_item13_overwrite_refuses_an_out_that_contains_src(tmp_path):
    src = write_tiny(tmp_path / "parent" / "src")
    _one_error(_run("convert", src, tmp_path / "parent", "--overwrite", "--quiet"), 2,
               "OUT must not be SRC", "or contain it")
    assert (src / "model.safetensors").is_file()  # SRC survives
    out = tmp_path / "q"
    assert _run("convert", src, out, "--quiet").exit_code == 0
    _one_error(_run("dequantize", out / "..", tmp_path / "d", "--overwrite", "--quiet"), 2, "OUT must not be SRC")


@pytest.mark.integration  # a real process and signal: seconds, not milliseconds
def test_item14_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """A convert killed by SIGTERM mid-write leaves no OUT and no temporary folder (exit 143)."""
    state = tiny_state(layers=2)
    for i in range(2, 40):  # enough layers that the conversion is still running when the signal lands
        state |= {k.replace("layers.0.", f"layers.{i}."): v for k, v in tiny_state(layers=1).items() if "layers.0." in k}
    src = write_tiny(tmp_path / "src", state=state, config={**CONFIG, "num_hidden_layers": 40})
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.qconvert", "convert", str(src), str(tmp_path / "out"),
                             "--max-shard-size", "30KB"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "convert finished before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): no output was left behind" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_item14_stale_temp_of_a_killed_writer_is_cleaned_by_the_next_one(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / ".out.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (stale / OWNER_FILE).write_text(json.dumps({"pid": pid, "start": None, "host": os.uname().nodename}))
    alive = tmp_path / ".other.def456.tmp"  # a live writer's folder (ours) is never touched
    alive.mkdir()
    (alive / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": None, "host": os.uname().nodename}))
    unknown = tmp_path / ".third.tmp"  # no owner file: cannot be proven dead, kept
    unknown.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("ok")
    assert not stale.exists() and alive.is_dir() and unknown.is_dir()
    assert (tmp_path / "out" / "f").read_text() == "ok" and not (tmp_path / "out" / OWNER_FILE).exists()
    assert clean_stale_temps(tmp_path) == []


def test_item15_full_shards_hold_no_open_files(tmp_path):
    """272 shards at a descriptor limit far below 4 per shard: the writer keeps only the open shard's files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 256), hard))
    try:
        w = ShardWriter(tmp_path, max_shard_size=64)
        for i in range(272):
            w.add_group({f"t{i}": torch.full((16,), float(i))})
        files = w.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(files) == 272
    assert load_file(str(files[271]))["t271"][0].item() == 271.0
