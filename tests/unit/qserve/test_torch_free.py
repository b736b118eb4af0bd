"""scheduler, block_manager, request, errors and adapters never import torch (STYLE.md §1).

Checked in a fresh interpreter with `import torch` made to fail. formats/__init__ re-exports torch code, so
the strict check loads the `formats` package without running its __init__ (qserve needs only formats.errors,
which is plain Python); the second test checks the plain import and is expected to fail until formats/__init__
stops importing torch eagerly.
"""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
MODULES = ["qlora_kit.qserve", "qlora_kit.qserve.errors", "qlora_kit.qserve.adapters", "qlora_kit.qserve.adapter_entry",
           "qlora_kit.qserve.adapter_folder", "qlora_kit.qserve.engine", "qlora_kit.qserve.engine.request",
           "qlora_kit.qserve.engine.block_manager", "qlora_kit.qserve.engine.scheduler", "qlora_kit.qserve.config",
           "qlora_kit.qserve.metrics"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_core_imports_without_torch():
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        f"for m in {MODULES!r}: __import__(m)\n"
        "print('ok')\n"
    )
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_plain_import_leaves_torch_unloaded():
    code = f"import sys\nfor m in {MODULES!r}: __import__(m)\nprint('torch' in sys.modules, 'qlora_kit.formats' in sys.modules)"
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "False"
