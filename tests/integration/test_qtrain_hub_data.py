"""qtrain train --data <Hub dataset id> from a pre-filled `datasets` cache with offline mode on (the real CLI in a
subprocess, so HF_HOME / HF_HUB_OFFLINE are read at import as a user's shell would set them)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.trainer.conftest import tiny_chat  # noqa: F401  (shared fixture)

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "formats"


def _cache_hub_dataset(hf_home: Path, repo_id: str, rows_file: Path) -> None:
    """Put `rows_file` into `datasets`' own cache as Hub dataset `repo_id`, the layout a real download leaves
    (<HF_HOME>/datasets/<owner>___<name>/<config>/<version>/<commit>/<name>-<split>.arrow + dataset_info.json)."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    builder = Json(data_files={"train": str(rows_file)}, dataset_name=name, hash="0" * 40, config_name="default",
                   cache_dir=str(hf_home / "build"))
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, hf_home / "datasets" / f"{owner}___{name}" / "default" / "0.0.0" / ("0" * 40))


def test_hub_id_trains_offline_from_the_cache(tiny_chat, tmp_path):
    hf_home = tmp_path / "hf"
    _cache_hub_dataset(hf_home, "quill/sharegpt-sample", SAMPLES / "sharegpt.jsonl")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    common = ["--base", str(tiny_chat), "--r", "2", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
              "--max-seq-len", "256", "--compute-dtype", "float32", "--target-modules", "q_proj", "--no-progress"]
    cmd = [sys.executable, "-m", "qlora_kit.trainer", "train", *common]
    res = subprocess.run(cmd + ["--data", "quill/sharegpt-sample", "--out", str(tmp_path / "o")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 steps" in res.stdout
    assert json.loads((tmp_path / "o" / "train_config.json").read_text())["data"] == "quill/sharegpt-sample"
    res = subprocess.run(cmd + ["--data", "quill/not-cached", "--out", str(tmp_path / "o2")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "quill/not-cached: cannot load the dataset (offline mode is on" in " ".join(res.stderr.split())
    assert not (tmp_path / "o2").exists()
