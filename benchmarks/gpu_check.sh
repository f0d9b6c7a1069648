#!/usr/bin/env bash
# The GPU path, checked end to end on a machine with a CUDA GPU, in about five minutes:
#   1. the toolkit's view of the device (bf16 support, memory);
#   2. every network sketch method over the package sample faces at 512 on CUDA (img/s);
#   3. a few training steps of both stages of the full 512 model on CUDA with mixed precision
#      (seconds per step, from stats.jsonl);
#   4. generation of 512 faces on CUDA (seconds per face);
#   5. two-process DDP training with torchrun when there are two or more GPUs.
# Run from the repository root with the toolkit installed (HED weights fetched):
#   bash benchmarks/gpu_check.sh [WORK_FOLDER]
set -euo pipefail
work="${1:-$(mktemp -d /tmp/dfd-gpu-check.XXXXXX)}"
steps="${GPU_CHECK_STEPS:-6}"
mkdir -p "$work"

python - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device; nothing to check here")
properties = torch.cuda.get_device_properties(0)
print(f"device: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} GPU(s), "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (fp16 + loss scaler)'}, torch {torch.__version__}")
EOF

echo "== sketch methods on CUDA, 512 px (dfd-data build-sketches summary lines)"
dfd-data samples "$work/photos" >/dev/null
for copy in 1 2 3 4 5 6 7; do  # 16 faces: the samples under other names, so batches fill
    for photo in "$work"/photos/*.*; do cp "$photo" "$work/photos/copy$copy-$(basename "$photo")"; done
done
dfd-data align "$work/photos" "$work/faces" --size 512 --quiet | tail -1
for method in hed hed+simplify photocopy+simplify; do
    dfd-data build-sketches "$work/faces" --method "$method" --device cuda --batch-size 8 --preview 0 --quiet | tail -1
done

echo "== training, full 512 model, $steps steps per stage, CUDA + mixed precision"
dfd-model train "$work/faces" --out "$work/run" --stage all --steps "$steps" --batch-size 2 --log-every 1 \
    --grid-every 1000 --checkpoint-every 1000 --device cuda --quiet | tail -1
python - "$work/run/stats.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for stage in (1, 2):
    times = [r["sec_per_step"] for r in rows if r["stage"] == stage][1:]  # the first step warms up
    print(f"stage {stage}: median {statistics.median(times):.3f} s/step over {len(times)} steps (batch 2)")
EOF

echo "== generation on CUDA, 512 px"
dfd-model generate --model "$work/run/model" "$work/faces/sketches/photocopy+simplify" -o "$work/generated" \
    --device cuda --batch-size 8 --quiet | tail -1

if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    echo "== torchrun, 2 GPUs (nccl), $steps steps of stage 1"
    torchrun --standalone --nproc-per-node 2 -m dfd_model train "$work/faces" --out "$work/run-ddp" --stage 1 \
        --steps "$steps" --batch-size 2 --device cuda --quiet | tail -1
fi
echo "gpu_check: done; outputs under $work"
