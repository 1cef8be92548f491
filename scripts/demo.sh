#!/usr/bin/env bash
# The whole life cycle on the embedded digits dataset:
# set up .venv -> fit (Lightning, CPU or CUDA) -> frozen ONNX -> batch predict with onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
T=.venv/bin/trainer
out=demo_out
mkdir -p "$out"

echo "== 1. fit: configs/digits.yaml (exports model.onnx at the end)"
$T fit --config configs/digits.yaml --trainer.enable_progress_bar false "$@"
run=$(ls -d runs/digits/version_* | sort -t_ -k2 -n | tail -1)
echo "run folder: $run"

echo "== 2. export again from the best checkpoint (the same parity-gated path fit used)"
best=$(ls "$run"/checkpoints/best-*.ckpt | head -1)
$T export --ckpt "$best" --out "$out/model.onnx"

echo "== 3. inspect the model card"
$T inspect "$out/model.onnx"

echo "== 4. batch predict the held-out test split with onnxruntime (no torch)"
$T data --config configs/digits.yaml --split test --out "$out/digits_test.npz"
$T predict --model "$out/model.onnx" --input "$out/digits_test.npz" --output "$out/predictions.csv"
echo "predictions: $out/predictions.csv ($(($(wc -l < "$out/predictions.csv") - 1)) rows)"
