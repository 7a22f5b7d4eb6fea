#!/usr/bin/env bash
# Issue 11's GPU measurements in one run, meant to finish in under 10 minutes on one H100/H200:
#   1. fairseq-train --fp16 and --bf16 through fairseq's own CLI, stock transformer and transformer_b2t, on a
#      generated toy corpus: the plugin's --bf16 handling (bf16 on the GPU, not fairseq 0.12's TPU mode);
#   2. benchmarks/bench_b2t_vs_transformer.py at 6L and 18L transformer_wmt_en_de size (d512, ffn 2048, 8 heads,
#      vocab 32000), fp16 and bf16 autocast: training target tokens/s, peak memory, beam-4 sentences/s;
#   3. benchmarks/gpu/methods_step.py: training steps of every method in fp16 and bf16 (finite? speed, memory).
# On the device (../shared/docs/DEVICE.md), from the repository root, with the kit installed:
#   bash benchmarks/gpu/run.sh
# Here, to check the script on the CPU (tiny sizes, fp32, a minute or two):
#   PYTHON=.venv/bin/python bash benchmarks/gpu/run.sh smoke
# Everything lands in $OUT (default gpu-bench-out/): machine.txt, the logs, the bench JSON and a RESULTS.md
# section per bench run to copy into benchmarks/RESULTS.md.
set -uo pipefail
mode=${1:-gpu}
py=${PYTHON:-python3}
out=$(realpath -m "${OUT:-gpu-bench-out}")
mkdir -p "$out"
{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import sys, torch, fairseq; print(sys.version.split()[0], torch.__version__, torch.version.cuda, fairseq.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$mode" = smoke ]; then
  precisions=(none); device=cpu
  size=(--layers 1 --embed-dim 32 --ffn-dim 64 --heads 2 --vocab 200 --batch-tokens 256 --gen-batch 4 --gen-len 5)
  depths=(1); repeats=2; step_args=(--device cpu --smoke --layers 1 --steps 2)
else
  precisions=(fp16 bf16); device=cuda
  size=(--embed-dim 512 --ffn-dim 2048 --heads 8 --vocab 32000 --batch-tokens 8192 --gen-batch 128)
  depths=(6 18); repeats=8; step_args=(--device cuda --layers 6 --steps 6)
fi

# 1. the real CLI in each precision
data="$out/toy"
"$py" -c "import sys; from b2t_fairseq.toy import translation as toy_translation; toy_translation.write_corpus(sys.argv[1], n_train=2000, n_valid=100, n_test=100, seed=1)" "$data/raw"
"$py" -m fairseq_cli.preprocess --source-lang src --target-lang tgt --trainpref "$data/raw/train" \
  --validpref "$data/raw/valid" --destdir "$data/bin" --joined-dictionary --workers 2 > "$out/preprocess.log" 2>&1
for precision in "${precisions[@]}"; do
  for arch in transformer transformer_b2t; do
    flag=(); [ "$precision" = none ] && flag=(--cpu) || flag=("--$precision")
    log="$out/cli-$arch-$precision.log"
    "$py" -m fairseq_cli.train "$data/bin" --user-dir b2t_fairseq --arch "$arch" --share-all-embeddings \
      --optimizer adam --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 10 --max-tokens 4096 \
      --max-update 40 --log-format json --log-interval 10 --no-save --num-workers 0 "${flag[@]}" > "$log" 2>&1
    rc=$?
    echo "cli $arch $precision: exit $rc; $(grep -o '"train_wps": "[0-9.]*"' "$log" | tail -1); $(grep -c 'torch_xla\|TPU' "$log") lines naming torch_xla or TPU"
  done
done

# 2. stock vs ours (exact, and int8 on the CPU) at 6L and 18L
for depth in "${depths[@]}"; do
  for precision in "${precisions[@]}"; do
    flag=(); [ "$precision" != none ] && flag=("--$precision")
    "$py" benchmarks/bench_b2t_vs_transformer.py --device "$device" --layers "$depth" "${size[@]}" "${flag[@]}" \
      --repeats "$repeats" --json "$out/bench-${depth}l-$precision.json" --results "$out/RESULTS.md" \
      > "$out/bench-${depth}l-$precision.log" 2>&1
    echo "bench ${depth}L $precision: exit $?"
  done
done

# 3. every method in each precision
"$py" benchmarks/gpu/methods_step.py "${step_args[@]}" > "$out/methods.jsonl" 2> "$out/methods.log"
echo "methods: exit $?"

echo "--- summary"
[ -f "$out/RESULTS.md" ] && grep -E '^\| (transformer|b2t)' "$out/RESULTS.md"
"$py" - "$out/methods.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['method']:20s} {r['precision']:5s} finite={r['finite']} tok/s={r.get('tgt_tokens_per_s')} "
          f"peak_MiB={r.get('peak_mib')} {r.get('error', '')}")
PY
