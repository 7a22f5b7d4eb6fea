#!/usr/bin/env bash
# The stability study's train and deep100 stages for every method, on a lent GPU (../shared/docs/DEVICE.md).
# Run here first:  .venv/bin/python experiments/stability_study.py --work study-out --stages data
# then on the device, from the repository root, with study-out carried and the kit installed:
#   bash experiments/gpu_study.sh study-out 5
# It starts no run after MINUTES (second argument) and stops all at MINUTES + 3; the finished runs' records
# (study.json), training logs and decoder outputs come back as $OUT/runs.tgz: unpack it in the repository root
# (it holds study-out/<run>/...), then `stability_study.py --stages report` here. A run without study.json is
# reported from its log as interrupted; rerunning the study does not continue it (its checkpoints stayed on the
# device) but starts it afresh.
# One H200, 2026-12-04: 12 trainings and 4 deep runs at once took ~8 minutes to train the 18L models, and
# decoding twelve models at once then did not finish; hence fewer runs at once below.
set -uo pipefail
work=${1:-study-out}
minutes=${2:-5}
# third argument: which methods (default every --connection); e.g. the issue-21 methods beside the baselines:
#   bash experiments/gpu_study.sh study-out 5 "post-ln pre-ln b2t mix-ln lns layerscale siamese hybridnorm"
read -r -a methods <<< "${3:-}"
# fourth argument: norm types of the 18L runs (default layernorm only), e.g. "layernorm rmsnorm dyt"
read -r -a norms <<< "${4:-}"
out=$(realpath -m "${OUT:-gpu-study-out}")
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
[ ${#methods[@]} -gt 0 ] && study+=(--methods "${methods[@]}")
train=("${study[@]}")
[ ${#norms[@]} -gt 0 ] && train+=(--norm-types "${norms[@]}")
timeout "$stop" "${train[@]}" --stages train --seeds 1 2 --jobs 6 > "$out/train.log" 2>&1 &
timeout "$stop" "${study[@]}" --stages deep100 --jobs 4 > "$out/deep100.log" 2>&1 &
wait
cd "$(dirname "$work")" && tar czf "$out/runs.tgz" --ignore-failed-read \
  "$(basename "$work")"/18l-*/{study.json,train.log,generate-test.txt} \
  "$(basename "$work")"/100l-*/{study.json,train.log} 2>/dev/null
cd - > /dev/null
grep -h '"method"' "$out"/train.log "$out"/deep100.log | cut -c1-200
echo "finished runs: $(ls "$work"/*/study.json 2>/dev/null | wc -l)"
