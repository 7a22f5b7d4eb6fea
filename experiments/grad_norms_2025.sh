#!/usr/bin/env bash
# Gradient norms at initialization for the methods of issue 21 beside B2T / Post-LN / Pre-LN, and for those three
# under each --norm-type: the same measurement as docs/stability/all-methods section 1 (b2t-grad-norms, the WMT
# sample's data-bin from `experiments/stability_study.py --stages data`, widths 128, FFN 512, 4 heads, 6L-6L and
# 18L-18L, seeds 1 2 3, 2 batches of 1024 tokens, each method with its own init). Writes CSVs, figures and
# ratios.md under docs/stability/methods-2025/ (or $1); a CSV already there is kept, so a rerun continues.
#   .venv/bin/python experiments/stability_study.py --work study-out --stages data
#   bash experiments/grad_norms_2025.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/stability/methods-2025}
py=${PYTHON:-.venv/bin/python}
data=${DATA_BIN:-study-out/data-bin}
[ -f "$data/dict.en.txt" ] || { echo "no data-bin at $data: run $py experiments/stability_study.py --work study-out --stages data" >&2; exit 2; }
mkdir -p "$out"
measure() {  # name, connections, extra model flags...
  local name=$1 connections=$2 layers=$3; shift 3
  [ -f "$out/$name.csv" ] && return 0
  # shellcheck disable=SC2086
  "$py" -m b2t_fairseq.analysis.grad_norms --data-bin "$data" --connections $connections --seeds 1 2 3 \
    --num-batches 2 --max-tokens 1024 --out-csv "$out/$name.csv" --out-png "$out/$name.png" \
    --title "$name, at initialization" -- --arch transformer_b2t --encoder-layers "$layers" --decoder-layers "$layers" \
    --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
    --encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings --dropout 0.0 \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 "$@"
}
for layers in 6 18; do
  measure "${layers}L-d128-methods" "post-ln pre-ln b2t mix-ln lns layerscale siamese hybridnorm" "$layers"
  for norm in rmsnorm dyt derf; do
    measure "${layers}L-d128-$norm" "post-ln pre-ln b2t" "$layers" --norm-type "$norm"
  done
done
"$py" - "$out" <<'PY'
import csv, sys
from pathlib import Path
sys.path.insert(0, ".")
from experiments.stability_study import grad_ratio_table
out = Path(sys.argv[1])
produced = {p.stem: (p, None) for p in sorted(out.glob("*.csv"))}
lines = ["| setting | method | stack | lowest / highest layer (mean over seeds) | min–max |", "|---|---|---|---|---|"]
for r in grad_ratio_table(produced):
    mean = "no gradient at the top" if r["ratio_mean"] is None else f"{r['ratio_mean']:.3g}"
    spread = "" if r["ratio_mean"] is None else f"{r['ratio_min']:.3g}–{r['ratio_max']:.3g}"
    lines.append(f"| {r['setting']} | {r['connection']} | {r['stack']} | {mean} | {spread} |")
from b2t_fairseq.safety import atomic
atomic.write_text(out / "ratios.md", "\n".join(lines) + "\n")  # whole or absent
print("\n".join(lines))
PY
