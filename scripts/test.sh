#!/usr/bin/env bash
# README command 2: install and run the whole test suite (every tier that runs on CPU; GPU tests skip).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m unit` for the fast loop.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m pytest -q "$@"
