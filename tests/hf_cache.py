"""A Hugging Face cache filled by a test (models--org--name/snapshots/<sha>/, refs/main) with offline mode on, so a
Hub id resolves through huggingface_hub exactly as after a real download, with no network."""
import shutil
from pathlib import Path


def offline_hub_cache(monkeypatch, root: Path, repo_id: str, folder: Path | None = None, sha: str = "c" * 40) -> Path:
    """Put `folder` (copied; None = an empty snapshot) in the cache under `root` as `repo_id` at `sha`, point
    huggingface_hub at that cache in offline mode, and return the snapshot folder."""
    import huggingface_hub.constants as c

    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    if folder is None:
        snapshot.mkdir(parents=True)
    else:
        shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return snapshot
