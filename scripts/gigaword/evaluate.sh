#!/usr/bin/env bash
# Usage: scripts/gigaword/evaluate.sh --save-dir DIR --data-bin DIR --out result.json [--ref FILE] \
#            [--average-last N] [--scale smoke] [--cpu]
# Thin wrapper: the recipe is b2t_fairseq/recipes/gigaword.py, its settings configs/gigaword/*.yaml.
# PYTHON picks the interpreter (default: python); the repository goes first on PYTHONPATH and its configs are
# passed explicitly, so the script works from any directory and with or without the package installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m b2t_fairseq.recipes.gigaword --config-dir "$repo/configs/gigaword" evaluate "$@"
