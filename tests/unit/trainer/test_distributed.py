"""trainer/distributed.py: sharding rules, and 2-process gloo runs on loopback (torch.multiprocessing, the
environment torchrun sets) against 1 process: `train` under 2 ranks (data parallel, the LoRA gradients summed by
dist.all_reduce) equals a 1-process run with the same global batch, its checkpoint resumes in a 1-process run, and train-many over 2 ranks gives the same adapters as 1 rank
and resumes under 1 rank. (tests/integration/test_qtrain_many.py runs the same through real torchrun.)"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qlora_kit.formats import load_adapter
from tests.unit.trainer._tiny import chat, write_jsonl
from tests.unit.trainer.test_many import one_thread, write_jobs  # noqa: F401  (autouse: 1 intra-op thread)
from qlora_kit.trainer import ConfigError, build_config, train
from qlora_kit.trainer.distributed import DataParallel, DistEnv, device_for, from_env, shard
from qlora_kit.trainer.many import ManyConfig, train_many

KW = {"r": 4, "lora_alpha": 8.0, "max_seq_len": 96, "batch_size": 2, "grad_accum": 3, "lora_dropout": 0.0,
      "learning_rate": 1e-2, "max_steps": 3, "compute_dtype": "float32", "progress": False, "warmup_steps": 1,
      "lr_scheduler": "cosine"}


@pytest.mark.unit
def test_shard_and_share_split_work_round_robin():
    assert shard(list(range(5)), DistEnv(1, 2)) == [1, 3] and shard(list(range(5)), DistEnv(0, 1)) == list(range(5))
    assert DataParallel(DistEnv(1, 2), torch.device("cpu")).share(["m0", "m1", "m2"]) == ["m1"]
    assert DataParallel(DistEnv(0, 2), torch.device("cpu")).share(["m0", "m1", "m2"]) == ["m0", "m2"]
    assert DataParallel(DistEnv(1, 2), torch.device("cpu")).share(["m0"]) == []  # rank 1 only adds zero gradients


@pytest.mark.unit
def test_from_env_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_env() == DistEnv(3, 4, 1) and not from_env().is_main


@pytest.mark.unit
def test_cuda_without_a_device_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' but no CUDA device is visible"):
        device_for(DistEnv(), "cuda")
    assert device_for(DistEnv(), "auto") == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: str, arg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if fn == "dp":
        train(build_config(None, **arg))
    else:
        train_many(ManyConfig(**arg))


def _spawn(world: int, fn: str, arg) -> None:
    mp.spawn(_worker, args=(world, _free_port(), fn, arg), nprocs=world, join=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for k in range(2):
        write_jsonl(root / f"d{k}.jsonl", [chat(f"Client {k} asks {i}?", f"Reply {k}.{i} " + "yes " * (i % 4))
                                           for i in range(14)])
    return root


def _same(x, y, atol=1e-5):
    _, tx = load_adapter(x)
    _, ty = load_adapter(y)
    assert sorted(tx) == sorted(ty)
    for k in tx:
        torch.testing.assert_close(tx[k], ty[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.integration  # two spawned processes: end to end, slower than the unit tier's budget
def test_two_rank_data_parallel_equals_one_process_and_resumes_in_one(tiny_chat, data, tmp_path):
    common = dict(KW, base=str(tiny_chat), data=str(data / "d0.jsonl"))
    one = train(build_config(None, **common, out=str(tmp_path / "one")))
    _spawn(2, "dp", dict(common, out=str(tmp_path / "two")))
    _same(tmp_path / "two", tmp_path / "one")
    losses = [json.loads(s)["loss"] for s in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one.losses), atol=1e-4, rtol=1e-5)
    # stopped under 2 ranks, finished by a 1-process `train --resume`: the checkpoint is world-size free
    _spawn(2, "dp", dict(common, out=str(tmp_path / "cut"), save_every=1, stop_after=2))
    assert (tmp_path / "cut" / "checkpoints" / "step-000002").is_dir()
    rest = train(build_config(None, **common, out=str(tmp_path / "cut"), resume=str(tmp_path / "cut")))
    assert rest.steps == 3 and len(rest.losses) == 1
    _same(tmp_path / "cut", tmp_path / "one")


@pytest.mark.integration
def test_train_many_over_two_ranks_equals_one_rank(tiny_chat, data, tmp_path):
    jobs = {"a": {"data": str(data / "d0.jsonl")}, "b": {"data": str(data / "d1.jsonl"), "r": 2, "seed": 5},
            "c": {"data": str(data / "d0.jsonl"), "packing": False, "max_steps": 2}}
    defaults = {k: v for k, v in KW.items() if k not in ("compute_dtype", "progress")}
    path = write_jobs(tmp_path / "jobs.toml", jobs, defaults)
    run = {"base": str(tiny_chat), "jobs": str(path), "compute_dtype": "float32", "progress": False}
    train_many(ManyConfig(**run, out=str(tmp_path / "one")))
    _spawn(2, "many", dict(run, out=str(tmp_path / "two")))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [r["job"] for r in summary["jobs"]] == ["a", "b", "c"] and summary["run"]["world_size"] == 2
    assert {r["status"] for r in summary["jobs"]} == {"done"}
    for name in jobs:
        _same(tmp_path / "two" / name, tmp_path / "one" / name)
    # stopped after 1 step under 2 ranks, resumed by 1 rank: per-job checkpoints do not depend on the world size
    cut = write_jobs(tmp_path / "cut.toml", jobs, {**defaults, "stop_after": 1})
    _spawn(2, "many", dict(run, jobs=str(cut), out=str(tmp_path / "cut")))
    assert {r["status"] for r in json.loads((tmp_path / "cut" / "summary.json").read_text())["jobs"]} == {"stopped"}
    res = train_many(ManyConfig(**run, out=str(tmp_path / "cut"), resume=True))
    assert {r["status"] for r in res.jobs} == {"done"}
    for name in jobs:
        _same(tmp_path / "cut" / name, tmp_path / "one" / name)
