#!/usr/bin/env bash
# The distillation step's GPU checks in one run, cheapest and most decisive first (sized for a 15-minute device lease):
#   1. sync check + vocabulary matmul (seconds): does the step run without a host sync; does 30,528 beat 30,522?
#   2. MFU of every variant at seq 128, then at seq 512, cheapest first, each printed as it finishes (a timeout
#      keeps what ran; the compiled variants come last, their compile takes a minute or two).
# On the device machine, from the repository root, after `make gpu-bundle` here:
#   run(command="bash benchmarks/gpu_p4.sh", carry=[".gpu"], timeout_s=560)
# Writes $OUT/gpu_p4.jsonl (one JSON line per result) and $OUT/profile.txt (torch.profiler tables).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_p4}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" TORCH_EXTENSIONS_DIR=/tmp/torch_ext
PY=${PY:-python3}
$PY -c "import deepspeed" 2>/dev/null || $PY -m pip install --quiet --no-index --no-deps .gpu/wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
timeout 100 $PY benchmarks/gpu_mfu.py --checks-only 2>"$OUT/checks.err" | tee -a "$OUT/gpu_p4.jsonl"
tail -5 "$OUT/checks.err"
for seq in 128 512; do
  timeout ${SEQ_TIMEOUT:-240} $PY benchmarks/gpu_mfu.py --skip-checks --seq-lens $seq --steps ${STEPS:-20} --profile "$OUT/profile.txt" \
    ${VARIANTS:+--variants $VARIANTS} 2>"$OUT/mfu$seq.err" | tee -a "$OUT/gpu_p4.jsonl"
  tail -5 "$OUT/mfu$seq.err"
done
