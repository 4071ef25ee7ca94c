#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (torch + transformers, no internet, no ray).
# $OUT is set there; results come back as $OUT/gpu_layers.json and $OUT/gpu_layers.log.
set -o pipefail
OUT="${OUT:-.}"
PYTHONUNBUFFERED=1 timeout 290 python3 bench/gpu_layer_latency.py --out "$OUT/gpu_layers.json" "$@" 2>&1 | tee "$OUT/gpu_layers.log"
