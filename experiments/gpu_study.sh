#!/usr/bin/env bash
# The stability study's train and deep100 stages for every method, on a lent GPU (../shared/docs/DEVICE.md).
# Run here first:  .venv/bin/python experiments/stability_study.py --work study-out --stages data
# then on the device, from the repository root, with study-out carried and the kit installed:
#   bash experiments/gpu_study.sh study-out 5
# It starts no run after MINUTES (second argument) and stops all at MINUTES + 3; each finished run's record
# (study.json) and training log are copied to $OUT/<run>/, for `stability_study.py --stages report` here.
set -uo pipefail
work=${1:-study-out}
minutes=${2:-5}
out=${OUT:-gpu-study-out}
mkdir -p "$out"
{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, fairseq; print(sys.version.split()[0], torch.__version__, torch.version.cuda, fairseq.__version__, torch.cuda.get_device_name(0))"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
stop=$(( (minutes + 3) * 60 ))
study=(python3 experiments/stability_study.py --work "$work" --gpu --deadline-minutes "$minutes")
timeout "$stop" "${study[@]}" --stages train --seeds 1 2 --jobs 12 > "$out/train.log" 2>&1 &
timeout "$stop" "${study[@]}" --stages deep100 --jobs 4 > "$out/deep100.log" 2>&1 &
wait
for run in "$work"/18l-* "$work"/100l-*; do
  [ -d "$run" ] || continue
  mkdir -p "$out/$(basename "$run")"
  cp "$run"/study.json "$run"/train.log "$run"/generate-test.txt "$out/$(basename "$run")/" 2>/dev/null
done
grep -h '"method"' "$out"/train.log "$out"/deep100.log | cut -c1-200
ls "$out"/*/study.json 2>/dev/null | wc -l
