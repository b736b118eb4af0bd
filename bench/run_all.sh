#!/usr/bin/env bash
# Regenerate every bench/results/*.md figure: each bench alone, one after another, with the exact command
# its results file names in its "Regenerate" line. Run from the repository root on a quiet machine:
#
#   bench/run_all.sh [LOG_DIR]          # default LOG_DIR: bench-logs-<UTC time>
#   PY=/path/to/python bench/run_all.sh
#
# Each bench prints its threads, reps, outlier rule and the load average before and after; this script also
# records `uptime` and the machine between benches. Paste each LOG_DIR/<name>.txt into bench/results/<name>.md.
# Not included: bench.vllm (needs .venv-vllm and .venv-vllm027; see bench/results/vllm.md) and the GPU benches.
set -euo pipefail
PY=${PY:-python}
LOG=${1:-bench-logs-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$LOG"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
run() {
  local name=$1; shift
  echo "== $name: $*  ($(date -u +%FT%TZ); $(uptime | sed 's/.*load/load/'))" | tee "$LOG/$name.txt"
  "$PY" "$@" 2>&1 | grep -v -e 'it/s\]' -e 'warnings.warn' | tee -a "$LOG/$name.txt"
}
{ uname -srm; lscpu | grep -E 'Model name|^CPU\(s\)'; "$PY" -c 'import torch, transformers, bitsandbytes, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__,
      "peft", peft.__version__)'; git rev-parse --short HEAD; } | tee "$LOG/machine.txt"
run threads     -m bench.threads
run dequant     -m bench.dequant
run convert     -m bench.convert
run convert_2thr -m bench.convert --threads 2
run forward     -m bench.forward
run train       -m bench.train
run serve       -m bench.serve
run serve_1thr  -m bench.serve --threads 1
run serve_eng2  -m bench.serve --engine-threads 2 --no-peer   # the measurement behind ServeConfig.threads = 1
run train_many  -m bench.train_many
run stream      -m bench.stream       # issue 15: per-token time, first vs last 100 of a 2,000-token stream
run fleet       -m bench.fleet        # issue 16: 1,000 adapters, 3,000 Zipf requests (~25 minutes)
echo "logs in $LOG"
