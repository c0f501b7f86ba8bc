#!/usr/bin/env bash
# One short, prepared GPU check for issue 13 (device-resident mining), for a machine with one
# NVIDIA GPU (written for an H200). From the repository root:
#
#     bash benchmarks/gpu_check.sh [DATA_DIR] [REPEAT]
#
# 1. installs the project (pip install -e .) unless MINING_SKIP_INSTALL=1;
# 2. prints the GPU and the torch / torchvision / CUDA versions;
# 3. runs the device-path tests on CUDA (parity of the torch ops and of the selector);
# 4. runs benchmarks/throughput.py with random-init ViT-B-16 in bf16 on the GTSDB frames,
#    REPEAT times over (default 4 -> 1,200 frames), one actor on the GPU: patches/s, GPU
#    utilisation (nvidia-smi samples), per-stage split, host ms/frame, parity on all 300
#    annotated frames, FLOPs/bytes and the projection next to the measurement;
# 5. the same with the tiny model (selection-bound ceiling: the model costs ~nothing);
# 6. issue 18: the index's coarse k-means (IVF2048 on 102,400 x 512) on the GPU vs faiss on the CPU;
# 7. issue 18: score-aware PQ encoding of 1M x 512 vectors on the GPU vs the CPU (codes must agree).
# Results: the JSON lines in $OUT (or ./gpu_check_out), one per run. Goal: >= 10,000 patches/s.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/gtsdb}"
REPEAT="${2:-4}"
OUTDIR="${OUT:-gpu_check_out}"
mkdir -p "$OUTDIR"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "${MINING_SKIP_INSTALL:-0}" != "1" ]; then
  echo "== install"
  python -m pip install -q -e ".[dev]" 2>&1 | tail -2
fi
echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'EOF'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
if [ ! -d "$DATA/images" ]; then
  echo "no GTSDB data at $DATA (expected images/ and annotations.csv)"; exit 2
fi

echo "== device-path parity tests on CUDA"
MINING_TEST_DEVICE=cuda timeout 300 python -m pytest -q -x tests/test_saliency_device.py tests/test_select_device.py 2>&1 | tail -3 || true
echo "== CUDA data path tests (nvJPEG batches, streams, pinned copies, bf16 batches)"
timeout 300 python -m pytest -q tests/test_batcher.py tests/test_mine_batched.py -k cuda 2>&1 | tail -3 || true

echo "== throughput: ViT-B-16 (random init, bf16), ${REPEAT}x the GTSDB frames, one GPU actor"
timeout 420 python benchmarks/throughput.py --data "$DATA" --device cuda --model ViT-B-16 --repeat "$REPEAT" \
  --parity-limit 300 2>&1 | tee "$OUTDIR/throughput_vitb16.log" | grep -v '^{' || true
tail -1 "$OUTDIR/throughput_vitb16.log" > "$OUTDIR/throughput_vitb16.json" || true

echo "== throughput: tiny model (selection-bound ceiling)"
timeout 240 python benchmarks/throughput.py --data "$DATA" --device cuda --model tiny-test-random --repeat "$REPEAT" \
  --skip parity,costs 2>&1 | tee "$OUTDIR/throughput_tiny.log" | grep -v '^{' || true
tail -1 "$OUTDIR/throughput_tiny.log" > "$OUTDIR/throughput_tiny.json" || true

echo "== issue 18: coarse k-means of the index on the device (torch; the PyPI faiss wheel has no GPU code)"
timeout 300 python benchmarks/kmeans_device.py --device cuda --nlist 2048 --n-train 102400 2>&1 \
  | tee "$OUTDIR/kmeans_device.log" | grep -v '^{' || true
tail -1 "$OUTDIR/kmeans_device.log" > "$OUTDIR/kmeans_device.json" || true

echo "== issue 18: score-aware PQ encoding on the device (mining.index.anisotropic)"
timeout 240 python benchmarks/encode_device.py --device cuda --n 1000000 2>&1 \
  | tee "$OUTDIR/encode_device.log" | grep -v '^{' || true
tail -1 "$OUTDIR/encode_device.log" > "$OUTDIR/encode_device.json" || true

echo "== results"
cat "$OUTDIR"/*.json
