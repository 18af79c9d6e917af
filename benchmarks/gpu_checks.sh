#!/usr/bin/env bash
# The GPU checks of the trainer, as one script for a lent GPU machine (see README "Benchmarks").
#   bash benchmarks/gpu_checks.sh OUT_DIR
# 1. train_step benchmark: ViT-S/16 224, batch 64, bf16 and fp16 + GradScaler, DINO vs SelfPatch, each as
#    baseline (foreach AdamW, host loss check every step), fused (the defaults), compile=blocks and
#    compile=full: images/s, peak memory, counted FLOPs and MFU, ratios to the baseline
#    (STEP_VARIANTS=baseline,fused limits the variants, e.g. when device time is short);
# 2. the trainer end to end on CUDA with the faithful default precision (fp16 + GradScaler), with bf16 and
#    with compile=blocks, and with the device augmentation backend;
# 3. the tiny-preset sweep (benchmarks/tiny_preset_sweep.py) on the GPU;
# 4. the data loader (benchmarks/loader.py): pil / tensor / device backends per core and through the
#    DataLoader with pinned memory, the device backend's colour stage on the GPU, against the SelfPatch
#    img/s of step 1.
set -uo pipefail
OUT="${1:-/tmp/gpu-out}"; mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
echo "== train_step benchmark"
"$PY" benchmarks/train_step.py --device cuda ${STEP_VARIANTS:+--variants "$STEP_VARIANTS"} \
  --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.txt"
echo "== trainer on CUDA: fp16 + GradScaler (precision=auto), bf16, fp16 with compile=blocks, the device backend"
for run in "auto" "bf16" "auto compile=blocks" "auto data.augment_backend=device"; do
  set -- $run
  name="$(echo "$run" | tr ' =.' '_--')"
  "$PY" -m trainer --config tiny_cpu device=cuda precision=$1 ${2:-} optim.epochs=2 data.max_samples=1280 \
    data.num_workers=8 logging.mlflow=false logging.log_every=10 checkpoint.output_dir=/tmp/gpu-$name \
    > "$OUT/trainer_$name.log" 2>&1
  echo "$run exit=$? $(tail -1 "$OUT/trainer_$name.log")" | tee -a "$OUT/trainer.txt"
done
echo "== tiny preset sweep"
"$PY" benchmarks/tiny_preset_sweep.py --device cuda --workers 8 --steps "${SWEEP_STEPS:-300}" ${SWEEP_ONLY:+--only "$SWEEP_ONLY"} \
  --json "$OUT/sweep.json" 2>&1 | grep -v '"event"' | tee "$OUT/sweep.txt"
echo "== data loader vs the trainer"
GPU_IMG_S="$("$PY" -c "import json; rows = json.load(open('$OUT/train_step.json')); print(max((r['img_per_s'] for r in rows if r.get('method') == 'selfpatch' and 'img_per_s' in r), default=604))" 2>/dev/null || echo 604)"
"$PY" benchmarks/loader.py --images 128 --workers 0 4 8 --repeats 2 --no-trainer --gpu-img-s "$GPU_IMG_S" \
  2>&1 | tee "$OUT/loader.txt"
