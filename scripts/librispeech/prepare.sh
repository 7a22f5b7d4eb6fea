#!/usr/bin/env bash
# Usage: scripts/librispeech/prepare.sh --data LIBRISPEECH_DIR --out DIR [--workers N] [--scale smoke]
# Thin wrapper: the recipe is b2t_fairseq/recipes/librispeech.py, its settings configs/librispeech/*.yaml.
# PYTHON picks the interpreter (default: python); the repository goes first on PYTHONPATH and its configs are
# passed explicitly, so the script works from any directory and with or without the package installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m b2t_fairseq.recipes.librispeech --config-dir "$repo/configs/librispeech" prepare "$@"
