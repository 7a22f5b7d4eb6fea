#!/usr/bin/env bash
# Issue 23's GPU evidence in one command, for a lent GPU (../shared/docs/DEVICE.md: 15 minutes in all, start-up
# included). The stages run in this order, so that a run cut off early still returns the most valuable part:
#   1. fairseq-train --fp16 and --bf16 through fairseq's own CLI, stock transformer and transformer_b2t, on a
#      generated toy corpus (bf16 on the GPU, not fairseq 0.12's TPU mode); then training steps of every
#      --connection and of stock transformer in fp16 and bf16 at 6L and 18L base width
#      (benchmarks/gpu/methods_step.py): finite or not, target tokens/s, peak memory;
#   2. benchmarks/bench_b2t_vs_transformer.py at 6L and 18L transformer_wmt_en_de size in fp16 and bf16: training
#      target tokens/s, peak memory and beam-4 generation sentences/s, each against stock transformer;
#   3. experiments/stability_study.py --stages base18: 18L-18L at transformer_wmt_en_de width, fp16, the paper's
#      learning rate and warmup, on the WMT sample: Post-LN, Pre-LN and B2T side by side for the minutes that remain.
# Each stage has a share of BUDGET_S (default 510 s, so that one run and a rerun fit the device's 15 minutes) and is
# stopped at its end; stage 3 gets what the first two left.
#
# Here, once (the kit of wheels the device lacks, and the WMT sample's data-bin that stage 3 trains on):
#   bash benchmarks/gpu/run.sh prepare
# On the device, from the repository root (the run tool's carry: .whl, study-out/data-bin, study-out/corpus):
#   bash benchmarks/gpu/run.sh
# Here, to check the whole script on the CPU (tiny sizes, fp32, every stage; about four minutes on 2 cores):
#   bash benchmarks/gpu/run.sh smoke
# Everything lands in $OUT (default gpu-bench-out/): machine.txt, each stage's logs, the bench JSON and a RESULTS.md
# section per bench run to copy into benchmarks/RESULTS.md, methods-*.jsonl, and base18-runs.tgz (unpack it in
# the repository root, then `python experiments/stability_study.py --stages report` here for docs/stability/).
set -uo pipefail
mode=${1:-gpu}
case "$mode" in gpu | smoke | prepare) ;; *) echo "run.sh: unknown mode '$mode'; use gpu (the default), smoke or prepare" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.." || exit 2
if [ -z "${PYTHON:-}" ] && [ "$mode" != gpu ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
py=${PYTHON:-python3}
work=study-out

if [ "$mode" = prepare ]; then
  kit=../shared/device/make-kit.sh
  if [ -f "$kit" ]; then bash "$kit" || exit 1; else echo "no $kit here: build .whl/ as ../shared/docs/DEVICE.md says"; fi
  "$py" experiments/stability_study.py --work "$work" --stages data || exit 1
  echo "prepared: carry .whl, $work/data-bin and $work/corpus with the device call"
  exit 0
fi

out=$(realpath -m "${OUT:-gpu-bench-out}")
mkdir -p "$out"
start=$SECONDS
budget=${BUDGET_S:-510}
left() { echo $((budget - (SECONDS - start))); }
stage_end() { echo $((start + budget * $1 / 100)); }  # a stage ends when $1 percent of the budget is spent
until_() { local s=$(($1 - SECONDS)); echo $((s > 1 ? s : 1)); }  # seconds from now until $1, at least 1

if [ "$mode" = gpu ]; then
  export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
  if ! "$py" -c "import fairseq" 2> /dev/null; then  # the device's image has no fairseq: the kit, installed once
    export PYTHONPATH=$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    if ! "$py" -c "import fairseq" 2> /dev/null; then
      [ -d .whl ] || { echo "fairseq does not import and there is no .whl/: run 'bash benchmarks/gpu/run.sh prepare' here and carry .whl" >&2; exit 2; }
      "$py" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 2
    fi
  fi
fi
{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2> /dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
  "$py" -c "import sys, torch, fairseq; print(sys.version.split()[0], torch.__version__, torch.version.cuda, fairseq.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$mode" = smoke ]; then
  precisions=(none); device=cpu
  size=(--embed-dim 32 --ffn-dim 64 --heads 2 --vocab 200 --batch-tokens 256 --gen-batch 4 --gen-len 5)
  depths=(1 2); repeats=2; updates=6; step_args=(--device cpu --smoke --steps 2)
  work=$out/study; study=(--smoke --data-bin "$out/toy/bin")  # the toy corpus; the real study-out stays untouched
else
  precisions=(fp16 bf16); device=cuda
  size=(--embed-dim 512 --ffn-dim 2048 --heads 8 --vocab 32000 --batch-tokens 8192 --gen-batch 128)
  depths=(6 18); repeats=3; updates=30; step_args=(--device cuda --steps 4); study=(--gpu)
fi

# 1. the real CLI in each precision, then every method's training steps in each precision at each depth
echo "--- 1. CLI and every method ($(left) s of the budget left)"
end1=$(stage_end 35)
data="$out/toy"
"$py" -c "import sys; from b2t_fairseq.toy import translation as toy_translation; toy_translation.write_corpus(sys.argv[1], n_train=2000, n_valid=100, n_test=100, seed=1)" "$data/raw"
"$py" -m fairseq_cli.preprocess --source-lang src --target-lang tgt --trainpref "$data/raw/train" \
  --validpref "$data/raw/valid" --destdir "$data/bin" --joined-dictionary --workers 2 > "$out/preprocess.log" 2>&1
for precision in "${precisions[@]}"; do
  for arch in transformer transformer_b2t; do
    flag=(); [ "$precision" = none ] && flag=(--cpu) || flag=("--$precision")
    log="$out/cli-$arch-$precision.log"
    timeout "$(until_ "$end1")" "$py" -m fairseq_cli.train "$data/bin" --user-dir b2t_fairseq --arch "$arch" \
      --share-all-embeddings --optimizer adam --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 10 \
      --max-tokens 4096 --max-update "$updates" --log-format json --log-interval 5 --no-save --num-workers 0 \
      "${flag[@]}" > "$log" 2>&1
    rc=$?
    echo "cli $arch $precision: exit $rc; $(grep -o '"train_wps": "[0-9.]*"' "$log" | tail -1); $(grep -c 'torch_xla\|TPU' "$log") lines naming torch_xla or TPU"
  done
done
for depth in "${depths[@]}"; do
  timeout "$(until_ "$end1")" "$py" benchmarks/gpu/methods_step.py "${step_args[@]}" --layers "$depth" \
    > "$out/methods-${depth}l.jsonl" 2> "$out/methods-${depth}l.log"
  echo "methods ${depth}L: exit $? ($(wc -l < "$out/methods-${depth}l.jsonl") records)"
done

# 2. stock vs ours at 6L and 18L in each precision
echo "--- 2. speed and memory against stock ($(left) s of the budget left)"
end2=$(stage_end 70)
for depth in "${depths[@]}"; do
  for precision in "${precisions[@]}"; do
    flag=(); [ "$precision" != none ] && flag=("--$precision")
    timeout "$(until_ "$end2")" "$py" benchmarks/bench_b2t_vs_transformer.py --device "$device" --layers "$depth" \
      "${size[@]}" "${flag[@]}" --repeats "$repeats" --json "$out/bench-${depth}l-$precision.json" \
      --results "$out/RESULTS.md" > "$out/bench-${depth}l-$precision.log" 2>&1
    echo "bench ${depth}L $precision: exit $?"
  done
done

# 3. the paper's 18L claim at base width, for what is left (the report and the archive need about 30 s)
echo "--- 3. 18L-18L base width, Post-LN / Pre-LN / B2T ($(left) s of the budget left)"
train_s=$(($(left) - 75))  # fairseq's start-up and data loading (~30 s) and the report (~30 s) come on top
if [ "$train_s" -lt 30 ]; then
  echo "base18: skipped, $(left) s left"
else
  minutes=$(awk -v s="$train_s" 'BEGIN { printf "%.2f", s / 60 }')
  [ "$mode" = smoke ] && minutes=1
  timeout "$(until_ $((start + budget - 30)))" "$py" experiments/stability_study.py --work "$work" \
    --stages base18 "${study[@]}" --minutes "$minutes" > "$out/base18.log" 2>&1
  echo "base18: exit $? ($minutes minutes of training per run)"
  # the report reads the runs' logs too, so it has something to say even of runs the timeout stopped
  timeout 25 "$py" experiments/stability_study.py --work "$work" --stages report "${study[@]}" \
    --docs "$out/docs" > "$out/base18-report.log" 2>&1
  tar czf "$out/base18-runs.tgz" --ignore-failed-read "$work"/18l{base,smoke}-*/{study.json,train.log} 2> /dev/null
fi

echo "--- summary ($((SECONDS - start)) s)"
[ -f "$out/RESULTS.md" ] && grep -E '^\| (transformer|b2t)' "$out/RESULTS.md"
"$py" - "$out"/methods-*l.jsonl << 'PY'
import json, sys
for path in sys.argv[1:]:
    records = [json.loads(line) for line in open(path) if line.strip()]
    stock = {r["precision"]: r for r in records if r["method"].startswith("transformer")}
    for r in records:
        s = stock.get(r["precision"], {})
        speed = r.get("tgt_tokens_per_s")
        ratio = f"{speed / s['tgt_tokens_per_s']:.2f}x stock" if speed and s.get("tgt_tokens_per_s") else ""
        print(f"{r['layers']:>2}L {r['method']:20s} {r['precision']:5s} finite={r['finite']} tok/s={speed} {ratio} "
              f"peak_MiB={r.get('peak_mib')} {r.get('error', '')}")
PY
[ -f "$out/docs/tables.md" ] && grep -A 6 '^### 18L-18L at transformer_wmt_en_de width' "$out/docs/tables.md"
exit 0
