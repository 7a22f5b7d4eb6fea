#!/usr/bin/env bash
# Usage: scripts/wikitext103/train.sh --method {b2t,post-ln,pre-ln} --depth {16,32} --gpus N \
#            --data-bin DIR --save-dir DIR [--scale smoke] [--max-tokens N] [--dry-run] [-- extra fairseq-train flags]
# Thin wrapper: the recipe is b2t_fairseq/recipes/wikitext103.py, its settings configs/wikitext103/*.yaml.
# PYTHON picks the interpreter (default: python); the repository goes first on PYTHONPATH and its configs are
# passed explicitly, so the script works from any directory and with or without the package installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m b2t_fairseq.recipes.wikitext103 --config-dir "$repo/configs/wikitext103" train "$@"
