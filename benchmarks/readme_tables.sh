#!/usr/bin/env bash
# Reproduce the README's benchmark tables: every result JSON in benchmarks/results/,
# then the Markdown rendered from them. CPU figures were measured with 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
T=${THREADS:-2}

$PY -m benchmarks --modality image --model tiny-sd-shapes --threads "$T" --repeats 3 --prompts 8 --steps 25 --guidance 5 \
  --methods "deepcache(interval=3),deepcache(interval=5),tome,sampler(scheduler=dpmpp_2m, steps=12),cfg_truncation,deepcache(interval=3)+cfg_truncation" \
  --json "$OUT/image-tiny-sd-shapes.json"
$PY -m benchmarks --modality image --model tiny-flux-shapes --threads "$T" --repeats 3 --prompts 8 --steps 25 --guidance 5 \
  --methods "teacache(threshold=0.4),block_cache,first_block_cache(threshold=0.3),taylorseer,mag_cache,pab,faster_cache,sampler(steps=12),cfg_truncation" \
  --json "$OUT/image-tiny-flux-shapes.json"
$PY -m benchmarks --modality image --model tiny-sd-shapes --threads "$T" --overhead --repeats 5 --prompts 4 --steps 25 \
  --json "$OUT/overhead-tiny-sd-shapes.json"
$PY -m benchmarks --modality text --model tiny-code-llama --threads "$T" --repeats 3 --prompts 4 --prompt-kind code \
  --max-new-tokens 128 --methods "speculative,prompt_lookup,lookahead,layer_skip,static_cache,snapkv,sink_cache" \
  --json "$OUT/text-code-tiny-code-llama.json"
$PY -m benchmarks --modality text --model tiny-code-llama --threads "$T" --repeats 3 --prompts 3 --prompt-kind edit \
  --max-new-tokens 128 --methods "speculative,prompt_lookup,lookahead" \
  --json "$OUT/text-edit-tiny-code-llama.json"
$PY -m benchmarks.report "$OUT"/*.json
