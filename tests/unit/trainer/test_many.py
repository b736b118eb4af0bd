"""trainer/many on a tiny model: 4 mixed jobs equal 4 solo `train` runs, failing jobs are skipped, resume after a
crash continues each job, and jobs-file errors name the file and job."""
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from qlora_kit.formats import load_adapter
from tests.unit.trainer._tiny import chat, write_jsonl
from qlora_kit.trainer import ConfigError, build_config, train
from qlora_kit.trainer.many import ManyConfig, load_jobs, train_many

DEFAULTS = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "max_seq_len": 96, "lora_dropout": 0.0,
            "learning_rate": 1e-2, "r": 4}
# rank, targets, packing, accumulation, schedule, optimizer and step count differ per job
JOBS = {
    "a": {"data": "d0.jsonl"},
    "b": {"data": "d1.jsonl", "r": 2, "target_modules": ["q_proj", "v_proj"], "packing": False, "seed": 7,
          "grad_accum": 1},
    "c": {"data": "d2.jsonl", "r": 8, "learning_rate": 5e-3, "lr_scheduler": "cosine", "warmup_steps": 1,
          "max_steps": 2},
    "d": {"data": "d0.jsonl", "optimizer": "adamw8bit", "max_grad_norm": 0.0, "seed": 3, "group_by_length": False},
}


def _toml(value) -> str:
    return json.dumps(value)  # strings, numbers, bools and string lists read the same in TOML


def write_jobs(path, jobs: dict, defaults: dict = DEFAULTS):
    lines = ["[defaults]"] + [f"{k} = {_toml(v)}" for k, v in defaults.items()]
    for name, kw in jobs.items():
        lines += ["", "[[jobs]]", f'name = "{name}"'] + [f"{k} = {_toml(v)}" for k, v in kw.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy shared CPU, OpenMP's spinning makes tiny ops (index_add) 1000x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tiny_chat, tmp_path_factory):
    """Datasets, the 4-job run and each job trained alone (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("many")
    for k in range(3):
        qa = [(f"Customer {k} question {i}?", f"Answer {k}.{i}: " + "ok " * (i % 5 + k)) for i in range(12)]
        write_jsonl(root / f"d{k}.jsonl", [chat(q, a) for q, a in qa])
    jobs = write_jobs(root / "jobs.toml", JOBS)
    res = train_many(ManyConfig(base=str(tiny_chat), jobs=str(jobs), out=str(root / "many"), compute_dtype="float32",
                                progress=False))
    solo = {}
    for name, kw in JOBS.items():
        kw = {**DEFAULTS, **kw, "data": str(root / kw["data"])}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
        solo[name] = train(build_config(None, base=str(tiny_chat), out=str(root / f"solo_{name}"),
                                        compute_dtype="float32", progress=False, **kw))
    return root, res, solo


def _assert_same_adapter(x, y, atol=1e-5):
    cx, tx = load_adapter(x)
    cy, ty = load_adapter(y)
    assert cx.to_json() | {"base_model_name_or_path": ""} == cy.to_json() | {"base_model_name_or_path": ""}
    assert sorted(tx) == sorted(ty)
    for k in tx:
        torch.testing.assert_close(tx[k], ty[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.integration  # trains 4-6 tiny runs (~20 s together); -m unit stays fast
def test_four_jobs_in_one_run_equal_four_solo_runs(world):
    root, res, solo = world
    assert [r["job"] for r in res.jobs] == list(JOBS) and {r["status"] for r in res.jobs} == {"done"}
    for row in res.jobs:
        name = row["job"]
        assert row["steps"] == len(solo[name].losses)
        torch.testing.assert_close(torch.tensor([row["first_loss"], row["last_loss"]]),
                                   torch.tensor([solo[name].losses[0], solo[name].losses[-1]]), atol=1e-4, rtol=1e-5)
        _assert_same_adapter(root / "many" / name, root / f"solo_{name}")
        lines = [json.loads(s) for s in (root / "many" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, len(solo[name].losses) + 1))
    summary = json.loads((root / "many" / "summary.json").read_text())
    assert [r["job"] for r in summary["jobs"]] == list(JOBS) and summary["run"]["world_size"] == 1


@pytest.mark.integration
def test_train_is_a_one_job_train_many_to_the_bit(world, tiny_chat):
    root, _, solo = world
    jobs = write_jobs(root / "one.toml", {"a": JOBS["a"]}, {**DEFAULTS, "eval_fraction": 0.25, "eval_every": 2})
    res = train_many(ManyConfig(base=str(tiny_chat), jobs=str(jobs), out=str(root / "one"), compute_dtype="float32",
                                progress=False))
    kw = {**DEFAULTS, **JOBS["a"], "data": str(root / JOBS["a"]["data"]), "eval_fraction": 0.25, "eval_every": 2}
    alone = train(build_config(None, base=str(tiny_chat), out=str(root / "alone"), compute_dtype="float32",
                               progress=False, **kw))
    _, tm = load_adapter(root / "one" / "a")
    _, ts = load_adapter(root / "alone")
    assert sorted(tm) == sorted(ts) and all(tm[k].equal(ts[k]) for k in tm)
    rows = [[json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()] for d in (root / "one" / "a",
                                                                                             root / "alone")]
    assert [r.get("loss", r.get("eval_loss")) for r in rows[0]] == [r.get("loss", r.get("eval_loss")) for r in rows[1]]
    assert [r["loss"] for r in rows[1] if "loss" in r] == alone.losses and res.jobs[0]["eval_loss"] == alone.eval_loss
    written = [json.loads((d / "train_config.json").read_text()) for d in (root / "one" / "a", root / "alone")]
    assert [w | {"out": ""} for w in written[:1]] == [w | {"out": ""} for w in written[1:]]
    assert sorted(p.name for p in (root / "one" / "a").iterdir()) == sorted(p.name for p in (root / "alone").iterdir())


@pytest.mark.integration
def test_resume_after_a_crash_continues_each_job(world, tiny_chat):
    root = world[0]
    jobs = write_jobs(root / "crash.toml", JOBS, {**DEFAULTS, "save_every": 2})
    # rows_per_pass=3 splits each round into several passes (one or two jobs each): same adapters, other float order
    run = ManyConfig(base=str(tiny_chat), jobs=str(jobs), out=str(root / "crash"), compute_dtype="float32",
                     progress=False, rows_per_pass=3)

    def crash(rnd, losses):
        if rnd == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_many(run, on_step=crash)
    assert (root / "crash" / "c" / "adapter_model.safetensors").is_file()  # c had 2 steps: done before the crash
    assert (root / "crash" / "a" / "checkpoints" / "step-000002").is_dir()
    resumed = {}
    res = train_many(replace(run, resume=True), on_step=lambda r, l: resumed.update(l))
    assert {r["status"] for r in res.jobs} == {"done"} and set(resumed) == {"a", "b", "d"}
    for name in JOBS:
        _assert_same_adapter(root / "crash" / name, root / "many" / name)
        steps = [json.loads(s)["step"] for s in (root / "crash" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1))


@pytest.mark.integration
def test_ctrl_c_checkpoints_every_running_job_and_resume_finishes(world, tiny_chat):
    root = world[0]
    jobs = write_jobs(root / "ctrlc.toml", {"a": JOBS["a"], "b": JOBS["b"]})
    run = ManyConfig(base=str(tiny_chat), jobs=str(jobs), out=str(root / "ctrlc"), compute_dtype="float32",
                     progress=False)

    def press_ctrl_c(rnd, losses):
        if rnd == 1:
            os.kill(os.getpid(), signal.SIGINT)

    res = train_many(run, on_step=press_ctrl_c)
    assert res.interrupted and [(r["status"], r["steps"]) for r in res.jobs] == [("stopped", 1)] * 2
    assert (root / "ctrlc" / "b" / "checkpoints" / "step-000001").is_dir()
    res = train_many(replace(run, resume=True))
    assert not res.interrupted and {r["status"] for r in res.jobs} == {"done"}
    for name in ("a", "b"):
        _assert_same_adapter(root / "ctrlc" / name, root / "many" / name)


@pytest.mark.integration
def test_failing_jobs_are_skipped_and_early_stop_ends_a_job(world, tiny_chat):
    root = world[0]
    write_jsonl(root / "bad.jsonl", ['{"messages": [}'])
    jobs = write_jobs(root / "failing.toml", {"a": JOBS["a"], "bad_data": {"data": "bad.jsonl"},
                                              "diverges": {"data": "d1.jsonl", "learning_rate": 1e30},
                                              # min_delta 100: the 2nd eval cannot improve enough, patience 1 stops it
                                              "stops_early": {"data": "d2.jsonl", "eval_fraction": 0.25,
                                                              "eval_every": 1, "max_steps": 4,
                                                              "early_stop_patience": 1, "early_stop_min_delta": 100.0}})
    res = train_many(ManyConfig(base=str(tiny_chat), jobs=str(jobs), out=str(root / "failing"), compute_dtype="float32",
                                progress=False))
    rows = {r["job"]: r for r in res.jobs}
    assert rows["a"]["status"] == "done"
    assert rows["bad_data"]["status"] == "failed" and "bad.jsonl:1: not valid JSON" in rows["bad_data"]["error"]
    assert rows["diverges"]["status"] == "failed" and ": loss is " in rows["diverges"]["error"]
    # issue 13 item 16: the last good state is kept, as loop.train does
    assert f"is kept at {root / 'failing' / 'diverges' / 'checkpoints'}" in rows["diverges"]["error"]
    assert rows["diverges"]["steps"] >= 1 and not (root / "failing" / "diverges" / "adapter_model.safetensors").exists()
    assert rows["stops_early"]["status"] == "early_stopped" and rows["stops_early"]["steps"] == 2
    assert (root / "failing" / "stops_early" / "adapter_model.safetensors").is_file()
    _assert_same_adapter(root / "failing" / "a", root / "solo_a")


@pytest.mark.unit
@pytest.mark.parametrize("text, message", [
    ('[[jobs]]\nname = "x"\ndata = "d.jsonl"\ncompute_dtype = "float16"\n', "job 'x': compute_dtype is run-wide"),
    ('[[jobs]]\nname = "x"\ndata = "d.jsonl"\n[[jobs]]\nname = "x"\ndata = "d.jsonl"\n', "job 'x': duplicate job name"),
    ('[[jobs]]\nname = "x"\ndata = "d.jsonl"\nr = 0\n', "job 'x': r=0: must be >= 1"),
    ('[[jobs]]\nname = "x"\ndata = "d.jsonl"\nranks = 4\n', "job 'x': unknown key 'ranks'"),
    ('[defaults]\nr = 4\n', "no jobs; add one [[jobs]] table"),
    ('[[jobs]]\nname = "x"\ndata = "d.jsonl"\nearly_stop_patience = 2\n', "early_stop_patience needs an eval set"),
])
def test_jobs_file_errors_name_the_file_and_job(tmp_path, text, message):
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_jobs(ManyConfig(base="m", jobs=str(path), out=str(tmp_path / "o")))
    assert message in str(e.value) and "jobs.toml" in str(e.value)
