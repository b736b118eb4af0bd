"""A Hub id where a folder is accepted, offline: the converted SmolLM2 is put into a pre-filled Hugging Face
cache (HF_HOME/hub/models--me--smollm2-nf4/snapshots/<sha>/, refs/main), then with HF_HUB_OFFLINE=1 the real
CLIs run as subprocesses: `qtrain train --base me/smollm2-nf4` runs 2 steps and names the Hub id in its adapter,
`qtrain ask --base` answers with it, `qserve serve me/smollm2-nf4 --adapter pip=...` accepts that adapter and answers
completions over HTTP for the base and the adapter, and a repo that is not cached is one line (exit 2)."""
import json
import os
import subprocess
import sys
import time
from importlib import resources

import httpx
import pytest

from tests.conftest import REPO
from tests.hf_cache import offline_hub_cache

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO_ID, SHA = "me/smollm2-nf4", "0123456789abcdef0123456789abcdef01234567"
DATA = resources.files("qlora_kit.trainer") / "datasets" / "quillfeather.jsonl"


@pytest.fixture(scope="module")
def hf_home(smollm2_nf4, tmp_path_factory):
    """HF_HOME for the subprocesses: the session's converted SmolLM2 cached as REPO_ID at SHA."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:  # the subprocesses read HF_HOME; this process's settings are restored
        offline_hub_cache(mp, home, REPO_ID, smollm2_nf4, SHA)
    return home


def _env(hf_home):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return env | {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _cli(module: str, *args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", f"qlora_kit.{module}", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def adapter(hf_home, tmp_path_factory):
    """`qtrain train --base <hub-id>`: 2 steps from the offline cache; the adapter names the Hub id as its base."""
    out = tmp_path_factory.mktemp("hub_train") / "adapter"
    r = _cli("trainer", "train", "--base", REPO_ID, "--data", DATA, "--out", out, "--max-steps", 2, "--batch-size", 1,
             "--grad-accum", 1, "--max-seq-len", 128, "--r", 4, "--target-modules", "q_proj,v_proj",
             "--no-progress", "--eval-fraction", 0, env=_env(hf_home))
    assert r.returncode == 0, r.stderr
    assert "2 steps, loss " in " ".join(r.stdout.split())  # rich wraps the line
    return out


def test_qtrain_trains_against_a_hub_id_from_the_offline_cache(adapter):
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID
    steps = [json.loads(s)["step"] for s in (adapter / "metrics.jsonl").read_text().splitlines() if '"loss"' in s]
    assert steps == [1, 2]


def test_qtrain_ask_takes_a_hub_id(hf_home, adapter):
    r = _cli("trainer", "ask", "--base", REPO_ID, "--adapter", adapter, "--max-tokens", 2, "Hello?", env=_env(hf_home))
    assert r.returncode == 0, r.stderr
    assert "Q: Hello?" in r.stdout and "adapter:" in r.stdout


def test_qserve_serves_a_hub_id_from_the_offline_cache(hf_home, adapter):
    """The adapter names `me/smollm2-nf4` as its base; the server (given that id) accepts it and answers for both."""
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kit.qserve", "serve", REPO_ID, "--adapter", f"pip={adapter}",
                             "--port", "0", "--max-model-len", "256", "--kv-cache-tokens", "1024", "--dtype", "float32"],
                            env=_env(hf_home), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        url, lines, deadline = None, [], time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "qserve: serving " in line:
                url = line.split(" on ", 1)[1].split()[0]
        assert url, "".join(lines)
        assert f"/hub/models--me--smollm2-nf4/snapshots/{SHA} " in lines[-1]
        names = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
        assert names == ["me/smollm2-nf4", "pip"], names  # the Hub id is the base's served name
        for name in names:
            reply = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "The capital of France is",
                                                              "max_tokens": 4, "temperature": 0}, timeout=120)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("cmd", [("qserve", "serve", "me/not-cached"),
                                 ("trainer", "train", "--base", "me/not-cached", "--data", DATA, "--out", "OUT")])
def test_a_hub_id_missing_from_the_offline_cache_is_one_line(hf_home, tmp_path, cmd):
    env = _env(hf_home)
    r = _cli(cmd[0], *[str(tmp_path / "o") if c == "OUT" else c for c in cmd[1:]], env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "me/not-cached: not a local folder, and HF_HUB_OFFLINE=1 but it is not in the Hugging Face cache" in r.stderr
    assert not (tmp_path / "o").exists()
