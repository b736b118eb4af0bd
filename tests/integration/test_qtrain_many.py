"""qtrain train-many and torchrun end to end on a tiny random model: CLI outputs and exit codes, and real
`torchrun --nproc-per-node 2 -m qlora_kit.trainer ...` runs (gloo, loopback) against 1-process runs."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from qlora_kit.formats import load_adapter
from tests.unit.trainer._tiny import chat, write_jsonl
from tests.unit.trainer.conftest import tiny_chat  # noqa: F401  (shared fixture)
from tests.unit.trainer.test_many import one_thread, write_jobs  # noqa: F401  (autouse: 1 intra-op thread)
from qlora_kit.trainer.cli import main

pytestmark = pytest.mark.integration

SETTINGS = {"r": 4, "max_seq_len": 96, "batch_size": 2, "grad_accum": 2, "lora_dropout": 0.0, "learning_rate": 1e-2,
            "max_steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("many_cli")
    for k in range(2):
        write_jsonl(root / f"d{k}.jsonl", [chat(f"Shop {k} question {i}?", f"Shop {k} says {i} " + "fine " * (i % 3))
                                           for i in range(10)])
    write_jsonl(root / "bad.jsonl", [chat("q", "a"), "not json"])
    return root


def _flags(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _same(x, y, atol=1e-5):
    _, tx = load_adapter(x)
    _, ty = load_adapter(y)
    assert sorted(tx) == sorted(ty)
    for k in tx:
        torch.testing.assert_close(tx[k], ty[k], atol=atol, rtol=1e-4, msg=k)


def test_train_many_cli_writes_adapters_and_summary_and_skips_a_bad_job(tiny_chat, data, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.toml", {"a": {"data": str(data / "d0.jsonl")},
                                               "b": {"data": str(data / "d1.jsonl"), "r": 2},
                                               "broken": {"data": str(data / "bad.jsonl")}}, SETTINGS)
    res = CliRunner().invoke(main, ["train-many", "--base", str(tiny_chat), "--jobs", str(jobs), "--out",
                                    str(tmp_path / "o"), "--compute-dtype", "float32", "--no-progress"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "2/3 jobs trained" in text and "failed jobs: broken" in text and "Traceback" not in res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    rows = {r["job"]: r for r in summary["jobs"]}
    assert rows["a"]["status"] == rows["b"]["status"] == "done"
    assert "bad.jsonl:2: not valid JSON" in rows["broken"]["error"]
    assert json.loads((tmp_path / "o" / "b" / "adapter_config.json").read_text())["r"] == 2


def test_bad_jobs_file_is_one_red_line_and_exit_2(tiny_chat, tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]]\nname = "x"\ndata = "d.jsonl"\ndevice = "cpu"\n')
    res = CliRunner().invoke(main, ["train-many", "--base", str(tiny_chat), "--jobs", str(path), "--out",
                                    str(tmp_path / "o")])
    assert res.exit_code == 2 and "job 'x': device is run-wide" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()


def _torchrun(args: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "qlora_kit.trainer", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def test_torchrun_two_ranks_train_equals_one_process(tiny_chat, data, tmp_path):
    # settings go in --config: torchrun's own parser reads a bare `--r` as an abbreviation of its --rdzv-* options
    config = tmp_path / "run.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in SETTINGS.items()))
    common = ["--config", str(config), "--base", str(tiny_chat), "--data", str(data / "d0.jsonl"), "--compute-dtype",
              "float32", "--no-progress"]
    one = CliRunner().invoke(main, ["train", *common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    _torchrun(["train", *common, "--out", str(tmp_path / "two")])
    _same(tmp_path / "two", tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_torchrun_two_ranks_train_many_equals_one_rank(tiny_chat, data, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.toml", {"a": {"data": str(data / "d0.jsonl")},
                                               "b": {"data": str(data / "d1.jsonl"), "seed": 3, "packing": False}},
                      SETTINGS)
    common = ["train-many", "--base", str(tiny_chat), "--jobs", str(jobs), "--compute-dtype", "float32",
              "--no-progress"]
    one = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    _torchrun([*common, "--out", str(tmp_path / "two")])
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["run"]["world_size"] == 2
    for name in ("a", "b"):
        _same(tmp_path / "two" / name, tmp_path / "one" / name)
