"""The wheel as a user installs it: one `qlora_kit` namespace, nothing else at the top of site-packages, the
declared runtime dependencies enough, and no clash with Hugging Face's `kernels` (which bitsandbytes and
transformers import).

Each test builds a fresh venv from the wheel. pip resolves from the same package index (and cache) the set-up
uses; torch==2.13.0 is installed first, as the README's set-up does, so no CUDA build is pulled. That first step is
done once per module (a venv holding only torch) and each test's venv starts as a hard-linked copy of it.
"""
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.qconvert.tiny import write_tiny

pytestmark = pytest.mark.integration

# Top-level names the old layout installed; none of them may come from our distribution again.
OLD_TOP_LEVEL = {"tests", "bench", "kernels", "models", "formats", "trainer", "qserve", "qconvert"}


def _run(cmd, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    env |= {"HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env_extra or {})}
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=1200, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy of what the sdist needs, so the build leaves no build/ folder in the checkout
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "qlora_kit", src / "qlora_kit", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src])
    (whl,) = dist.glob("qlora_kit-*.whl")
    return whl


@pytest.fixture(scope="module")
def torch_venv(tmp_path_factory) -> Path:
    """A venv holding pip and torch==2.13.0 only, never used itself: the start of every test's venv."""
    root = tmp_path_factory.mktemp("torch_venv") / "venv"
    venv.create(root, with_pip=True)
    _run([root / "bin" / "python", "-m", "pip", "install", "-q", "torch==2.13.0"])
    return root


def _fresh_venv(torch_venv: Path, root: Path, *requirements) -> Path:
    """A venv in `root` (run from /, so the repository is not on sys.path) with torch==2.13.0 and `requirements`:
    torch_venv's files hard-linked (its scripts name torch_venv's python; ours are run as `python -m`, and the ones
    pip installs here name this venv's), then `requirements` installed by pip."""
    shutil.copytree(torch_venv, root, symlinks=True, copy_function=os.link)  # pip replaces files, never edits them
    py = root / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", *requirements])
    return py


def _installed_top_level(py: Path) -> set[str]:
    code = ("import importlib.metadata as m\n"
            "print('\\n'.join(sorted({str(f).split('/')[0] for f in m.files('qlora-kit')})))")
    return set(_run([py, "-c", code], cwd="/").stdout.split())


def test_wheel_installs_only_the_qlora_kit_namespace(wheel):
    import zipfile

    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in names if not n.endswith(".dist-info")} == {"qlora_kit"}, names
    files = zipfile.ZipFile(wheel).namelist()
    assert "qlora_kit/trainer/datasets/quillfeather.jsonl" in files
    assert "qlora_kit/trainer/configs/quillfeather.toml" in files
    from qlora_kit.kernels.cpu._build import HEADERS, SOURCES

    for src in SOURCES + HEADERS:  # every file the CPU kernels are compiled from
        assert f"qlora_kit/kernels/cpu/{src.name}" in files
    (ep,) = [n for n in files if n.endswith("entry_points.txt")]
    entry_points = zipfile.ZipFile(wheel).read(ep).decode()
    assert "qlora_kit = qlora_kit.qserve.vllm_plugin:register" in entry_points
    assert "qconvert = qlora_kit.qconvert.cli:main" in entry_points


def test_runtime_dependencies_alone_convert_and_verify(wheel, torch_venv, tmp_path):
    py = _fresh_venv(torch_venv, tmp_path / "venv", wheel)
    assert _installed_top_level(py) & OLD_TOP_LEVEL == set()
    out = _run([py, "-c", "import qlora_kit, sys; print(qlora_kit.__version__, 'torch' in sys.modules)"], cwd="/")
    assert out.stdout.split() == ["0.1.0", "False"]
    # nothing beyond the declared dependencies: the oracles and the test extra are absent
    missing = _run([py, "-c", "import importlib.util as u; print([m for m in ('bitsandbytes', 'transformers', "
                               "'peft', 'pytest', 'scipy') if u.find_spec(m)])"], cwd="/")
    assert missing.stdout.strip() == "[]"
    src = write_tiny(tmp_path / "src")
    bindir = py.parent
    _run([bindir / "qconvert", "convert", src, tmp_path / "nf4", "--quiet"], cwd="/")
    verify = _run([bindir / "qconvert", "verify", tmp_path / "nf4", "--against", src], cwd="/")
    assert "fail" not in verify.stdout.lower()
    _run([py, "-m", "qlora_kit.qconvert", "inspect", tmp_path / "nf4"], cwd="/")
    # the CPU kernels compile from the installed C source and match the twin
    code = ("import torch; from qlora_kit.formats import quantize_4bit, dequantize_4bit\n"
            "from qlora_kit.kernels.cpu import available, dequant_cpu\n"
            "p = quantize_4bit(torch.randn(64, 64)); print(available(), torch.equal(dequant_cpu(p, torch.float32), "
            "dequantize_4bit(p, torch.float32)))")
    cache = {"QLORA_KIT_CACHE": str(tmp_path / "kcache")}
    assert _run([py, "-c", code], cwd="/", env_extra=cache).stdout.split() == ["True", "True"]


def test_beside_hugging_face_kernels_transformers_and_bitsandbytes(wheel, torch_venv, tmp_path):
    py = _fresh_venv(torch_venv, tmp_path / "venv", wheel, "kernels", "transformers>=5.0", "bitsandbytes==0.50.*")
    assert _installed_top_level(py) & OLD_TOP_LEVEL == set()
    out = _run([py, "-c", "import kernels; print(callable(kernels.get_kernel))"], cwd="/")
    assert out.stdout.strip() == "True"
    bnb = _run([py, "-c", "import bitsandbytes, qlora_kit.kernels, transformers; print('ok')"], cwd="/")
    assert bnb.stdout.strip() == "ok"
    assert "Failed to load" not in bnb.stdout + bnb.stderr, bnb.stderr
    for cli in ("qconvert", "qtrain", "qserve"):
        assert "Usage:" in _run([py.parent / cli, "--help"], cwd="/").stdout
    src = write_tiny(tmp_path / "src")
    _run([py.parent / "qconvert", "convert", src, tmp_path / "nf4", "--quiet"], cwd="/")
    assert (tmp_path / "nf4" / "config.json").is_file()
