#!/usr/bin/env bash
# The GPU path, checked end to end on a machine with a CUDA GPU, in about five minutes:
#   1. the device as the toolkit sees it;
#   2. the network sketch methods over 16 faces at 512 on CUDA (build-sketches summary lines);
#   3. a few training steps of both stages of the full 512 model with mixed precision, through
#      `dfd-model train` (page-locked batches copied without blocking; grid, checkpoint, banks);
#   4. two more steps of stage 2 resumed from the run's last checkpoint (optimiser state
#      restored on the device), then generation of faces from the sketches with that model;
#   5. `python -m benchmarks.gpu`: each network and training step beside eager fp32 and its
#      FLOP-bound time, fp16 training with the loss scaler, and results beside the CPU's;
#   6. two-process DDP training with torchrun (nccl) when there are two or more GPUs.
# Run from the repository root with the toolkit installed and the HED weights fetched:
#   bash benchmarks/gpu_check.sh [WORK_FOLDER [ALIGNED_FACES]]
# ALIGNED_FACES: a dataset already aligned at 512 px, for a machine without dlib's models;
# without it the package's sample photos are aligned first. GPU_CHECK_DEVICE=cpu tries the
# script on a machine without a GPU (slowly: use GPU_CHECK_STEPS=2 and GPU_CHECK_QUICK=1).
set -euo pipefail
steps="${GPU_CHECK_STEPS:-6}"
device="${GPU_CHECK_DEVICE:-cuda}"

python - "$device" <<'EOF'
import sys
import torch
from dfd_data.devices import native_bf16
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device; nothing to check here")
    properties = torch.cuda.get_device_properties(0)
    print(f"device: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} GPU(s), "
          f"native bf16 {'yes' if native_bf16(torch.device('cuda')) else 'no (fp16 + loss scaler)'}, torch {torch.__version__}")
EOF
work="${1:-$(mktemp -d /tmp/dfd-gpu-check.XXXXXX)}"  # (made once a GPU is known to be there)
mkdir -p "$work"
dfd-model env --device "$device"

faces="$work/faces"
if [ -n "${2:-}" ]; then
    cp -r "$2" "$faces"
else
    dfd-data samples "$work/photos" >/dev/null
    originals=("$work"/photos/*.*)
    for copy in 1 2 3 4 5 6 7; do  # 16 faces: the samples under other names, so batches fill
        for photo in "${originals[@]}"; do cp "$photo" "$work/photos/copy$copy-$(basename "$photo")"; done
    done
    dfd-data align "$work/photos" "$faces" --size 512 --quiet | tail -1
fi

echo "== sketch methods on $device, 512 px (build-sketches summary lines)"
for method in hed hed+simplify photocopy+simplify; do
    dfd-data build-sketches "$faces" --method "$method" --device "$device" --batch-size 8 --preview 0 --quiet | tail -1
done

echo "== training through dfd-model train: full 512 model, $steps steps per stage, $device, mixed precision"
dfd-model train "$faces" --out "$work/run" --stage all --steps "$steps" --batch-size 2 --log-every 1 \
    --device "$device" --quiet | tail -1
python - "$work/run/stats.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for stage in (1, 2):
    times = [r["sec_per_step"] for r in rows if r["stage"] == stage][1:]  # the first step warms up
    print(f"stage {stage}: median {statistics.median(times):.3f} s/step over {len(times)} steps (batch 2)")
EOF

echo "== resuming that run from its last checkpoint: 2 more steps of stage 2 (Adam's moments restored on $device)"
dfd-model train "$faces" --out "$work/run" --resume --steps "$((steps + 2))" --batch-size 2 --log-every 1 \
    --device "$device" --quiet | tail -1
python - "$work/run/stats.jsonl" <<'EOF'
import json, sys
rows = [row for row in map(json.loads, open(sys.argv[1])) if row["stage"] == 2]
print("stage 2 g_total by step:", ", ".join(f"{r['step']}: {r['losses']['g_total']:.3f}" for r in rows))
EOF

echo "== generation through dfd-model generate, 512 px, $device"
dfd-model generate --model "$work/run/model" "$faces/sketches/photocopy+simplify" -o "$work/generated" \
    --device "$device" --batch-size 8 --grid --quiet | tail -1

echo "== python -m benchmarks.gpu"
python -m benchmarks.gpu "$faces" --device "$device" --json "$work/gpu.json" ${GPU_CHECK_QUICK:+--quick}

if [ "$device" = cuda ] && [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    echo "== torchrun, 2 GPUs (nccl), $steps steps of stage 1"
    torchrun --standalone --nproc-per-node 2 -m dfd_model train "$faces" --out "$work/run-ddp" --stage 1 \
        --steps "$steps" --batch-size 2 --device cuda --quiet | tail -1
fi
echo "gpu_check: done; outputs under $work"
