#!/usr/bin/env bash
# Usage: scripts/wmt_en_de/prepare.sh --out DIR (--release DIR | --archive wmt16_en_de.tar.gz | --download) \
#            (--refs DIR | --fetch-refs) [--years 2010 ... 2016] [--workers N]
# Thin wrapper: the recipe is b2t_fairseq/recipes/wmt_en_de.py, its settings configs/wmt_en_de/*.yaml.
# PYTHON picks the interpreter (default: python); the repository goes first on PYTHONPATH and its configs are
# passed explicitly, so the script works from any directory and with or without the package installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m b2t_fairseq.recipes.wmt_en_de --config-dir "$repo/configs/wmt_en_de" prepare "$@"
