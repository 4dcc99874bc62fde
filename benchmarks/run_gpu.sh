#!/usr/bin/env bash
# All benchmarks once on a CUDA device, SmolLM2-135M in bfloat16 with sdpa (about 2-3 minutes on an H100).
# Usage, from the repository root:  bash benchmarks/run_gpu.sh OUT_DIR
# Writes OUT_DIR/tables.txt (GPU name + every table), OUT_DIR/{read,inject,scale,footprint}.json, OUT_DIR/scale.png.
# SmolLM2 is found through $MEMORYLLM_HF_GGUF (the GGUF file) and cached under $MEMORYLLM_HF_CACHE; $PYTHON picks
# the interpreter (default python3). A failing script is reported and the others still run.
set -uo pipefail
out=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
gpu=(--model smollm2 --device cuda --attn sdpa)
failed=0
bench() {
    "$py" -m "benchmarks.$1" "${gpu[@]}" "${@:2}" --json "$out/$1.json" || { echo "FAILED: benchmarks.$1"; failed=1; }
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    bench read --dtype bfloat16 --repeats 4 --new-tokens 32
    bench inject --dtype bfloat16 --repeats 8
    plot=(--plot "$out/scale.png")
    "$py" -c "import matplotlib" 2>/dev/null || { plot=(); echo "no matplotlib: redraw with --replot"; }
    bench scale --dtype bfloat16 --repeats 8 "${plot[@]}"
    bench footprint
    exit "$failed"
} 2>&1 | tee "$out/tables.txt"
