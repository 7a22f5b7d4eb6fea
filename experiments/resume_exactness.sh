#!/usr/bin/env bash
# Is a resumed fairseq-train run exact with dropout? (issue 9; results in docs/resume_exactness.md)
# For each setting: an uninterrupted 3-epoch run, and a 2-epoch run resumed to epoch 3 (what a run killed after
# its epoch-2 checkpoint does when rerun); prints the epoch-3 train loss of both. Toy corpus, 1-layer d16 model,
# dropout 0.1, CPU, about a minute.
#   bash experiments/resume_exactness.sh [WORK_DIR]      (default: a fresh temporary directory)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-$repo/.venv/bin}
work=${1:-$(mktemp -d)}
mkdir -p "$work" && cd "$work"
export OMP_NUM_THREADS=1
[ -f bin/preprocess.log ] || {
  "$bin/python" -c "from b2t_fairseq.toy import translation as toy_translation; toy_translation.write_corpus('raw', 200, 20, 20, seed=1)"
  "$bin/fairseq-preprocess" --source-lang src --target-lang tgt --trainpref raw/train --validpref raw/valid \
    --testpref raw/test --destdir bin --joined-dictionary > /dev/null 2>&1
}
model="--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 16
  --decoder-ffn-embed-dim 16 --encoder-attention-heads 2 --decoder-attention-heads 2 --dropout 0.1"
optim="--optimizer adam --lr 2e-3 --lr-scheduler inverse_sqrt --warmup-updates 20 --max-tokens 500 --cpu --seed 1
  --num-workers 0 --log-format json --no-epoch-checkpoints"
epoch3() { grep '| train |' | grep '"epoch": 3' | sed 's/.*"train_loss": "\([0-9.]*\)".*/\1/' || echo failed; }
echo "| setting | uninterrupted epoch-3 loss | resumed epoch-3 loss |"
echo "|---|---|---|"
for setting in "stock transformer, fairseq alone|--arch transformer" \
               "stock transformer, --user-dir b2t_fairseq|--arch transformer --user-dir b2t_fairseq" \
               "transformer_b2t (+ word dropout 0.1)|--arch transformer_b2t --user-dir b2t_fairseq --sampling-method worddrop --enc-replace-rate 0.1 --dec-replace-rate 0.1"; do
  name=${setting%%|*}; flags=${setting#*|}; dir=runs/$(echo "$name" | tr -c 'a-z0-9' _)
  # fairseq alone cannot reload its own checkpoint under torch >= 2.6 with the safe unpickler (the plugin
  # allow-lists what it needs); for that row only, torch's documented override
  if [[ $flags != *user-dir* ]]; then export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; else unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; fi
  rm -rf "$dir" && mkdir -p "$dir"
  ref=$("$bin/fairseq-train" bin $flags $model $optim --max-epoch 3 --save-dir "$dir/ref" 2>/dev/null | epoch3)
  "$bin/fairseq-train" bin $flags $model $optim --max-epoch 2 --save-dir "$dir/res" > /dev/null 2>&1
  res=$("$bin/fairseq-train" bin $flags $model $optim --max-epoch 3 --save-dir "$dir/res" 2>/dev/null | epoch3)
  echo "| $name | $ref | $res |"
done
