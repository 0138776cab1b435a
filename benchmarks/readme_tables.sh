#!/usr/bin/env bash
# Reproduce the README's benchmark tables: every result JSON in benchmarks/results/,
# then the Markdown rendered from them. Text and image series run side by side, one
# thread each (a 2-core machine); each ratio comes from runs interleaved in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"

text() {
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 2 --prompts 3 --prompt-kind code \
    --max-new-tokens 96 \
    --methods "speculative,speculative(num_assistant_tokens=3),prompt_lookup,lookahead,lookahead(window=1),lookahead(window=4),layer_skip,static_cache,snapkv,sink_cache" \
    --json "$OUT/text-code-tiny-code-llama.json"
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 2 --prompts 3 --prompt-kind edit \
    --max-new-tokens 96 --methods "speculative,speculative(num_assistant_tokens=3),prompt_lookup,lookahead" --json "$OUT/text-edit-tiny-code-llama.json"
}
image() {
  $PY -m benchmarks --modality image --model tiny-sd-shapes --threads 1 --repeats 2 --prompts 16 --steps 25 --guidance 5 \
    --methods "deepcache(interval=3),deepcache(interval=5),tome,sampler(scheduler=dpmpp_2m, steps=12),cfg_truncation,deepcache(interval=3)+cfg_truncation" \
    --json "$OUT/image-tiny-sd-shapes.json"
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 16 --steps 25 --guidance 5 \
    --methods "teacache(threshold=0.4),adacache,block_cache,first_block_cache(threshold=0.3),taylorseer,mag_cache,pab,faster_cache,sampler(steps=12),cfg_truncation" \
    --json "$OUT/image-tiny-flux-shapes.json"
  $PY -m benchmarks --modality image --model tiny-sd-shapes --threads 1 --overhead --repeats 5 --prompts 4 --steps 25 \
    --json "$OUT/overhead-tiny-sd-shapes.json"
}
arimage() {  # issue 21: the autoregressive (LlamaGen-style) image model and its token-loop methods
  $PY -m benchmarks --modality image --model tiny-ar-shapes --threads 1 --repeats 2 --prompts 16 --guidance 1.5 \
    --methods "sjd,sjd(window=8),lantern,zipar,zipar(window=2)" --json "$OUT/image-tiny-ar-shapes.json"
}
video() {
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 12 \
    --params '{"steps": 25, "guidance": 3.0}' \
    --methods "teacache,adacache,adacache(moreg=false),first_block_cache,mag_cache,pab,block_cache,sampler(steps=12),cfg_truncation" \
    --json "$OUT/video-tiny-video-shapes.json"
}
audio() {
  $PY -m benchmarks --modality audio --model tiny-audio-synth --threads 1 --repeats 2 --prompts 12 \
    --params '{"steps": 25, "guidance": 3.0}' \
    --methods "deepcache(interval=3),sampler(steps=12),cfg_truncation,deepcache(interval=3)+cfg_truncation" \
    --json "$OUT/audio-tiny-audio-synth.json"
}
textseeds() {  # issue 20: prefix cache (time to first token), Token Recycling, retrieval drafting
  $PY -m benchmarks.prefix_cache --repeats 3 --threads 1 --json "$OUT/textseeds-prefix-cache.json"
  for kind in code edit; do
    $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 2 --prompts $([ $kind = code ] && echo 4 || echo 3) \
      --prompt-kind $kind --max-new-tokens 128 \
      --methods "token_recycling,token_recycling(persist=false),retrieval_draft,retrieval_draft(context=false),dynamic_tree,lookahead,prompt_lookup,speculative(num_assistant_tokens=3)" \
      --json "$OUT/textseeds-$kind.json"
  done
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 1 --prompts 4 --prompt-kind code \
    --max-new-tokens 96 --json "$OUT/textseeds-recycling-sweep.json" \
    --methods "token_recycling(tree_size=6,depth=4),token_recycling,token_recycling(tree_size=20),token_recycling(tree_size=32,depth=8),token_recycling(k=4)"
}
textlossy() {  # issue 20, lossy: FFN-SkipLLM and MiniCache (rows add held-out perplexity by teacher-forced decoding)
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 2 --prompts 4 --prompt-kind code \
    --max-new-tokens 96 --methods "ffn_skip,ffn_skip(mode=attention),ffn_skip(skip_fraction=0.5, protect_first=1, protect_last=1)" \
    --json "$OUT/textlossy-ffnskip-code.json"
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 2 --prompts 4 --prompt-kind code \
    --max-new-tokens 96 --methods "minicache,minicache(retention=0.0),minicache(start=0.75),minicache(retention=1.0)" \
    --json "$OUT/textlossy-minicache-code.json"
}
textctx() {  # issue 20 items 7-8: context-chunk reuse and prompt compression (time to first token)
  $PY -m benchmarks.context_reuse --cases 4 --docs 7 --repeats 5 --threads 1 --json "$OUT/textctx-context-reuse.json"
}
ideal() {  # caching methods: measured vs ideal speedup, and Compare's figure vs the CLI's
  $PY -m benchmarks --modality image --model tiny-sd-shapes --threads 1 --repeats 3 --prompts 4 --steps 25 --guidance 5 \
    --methods "deepcache(interval=3),deepcache(interval=5)" --json "$OUT/ideal-tiny-sd-shapes.json"
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 3 --prompts 4 --steps 25 --guidance 5 \
    --methods "teacache(threshold=0.4),adacache,block_cache,first_block_cache(threshold=0.3),mag_cache" \
    --json "$OUT/ideal-tiny-flux-shapes.json"
  $PY -m benchmarks.compare_check --json "$OUT/compare-check-tiny-sd-shapes.json" || true
}
calibration() {  # TeaCache with the model's own fitted curve vs without, thresholds picked for matching PSNR
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 4 --steps 25 --guidance 5 \
    --calibrate-teacache 3 --methods "teacache(threshold=0.2, rescale=flux),teacache(threshold=0.15, rescale=calibrated),teacache(threshold=0.4, rescale=flux),teacache(threshold=0.33, rescale=calibrated)" \
    --json "$OUT/calibration-tiny-flux-shapes.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 3 --prompts 4 \
    --params '{"steps": 25, "guidance": 3.0}' --calibrate-teacache 3 \
    --methods "teacache(threshold=0.15, rescale=none),teacache(threshold=0.07, rescale=calibrated),teacache(threshold=0.5, rescale=none),teacache(threshold=0.15, rescale=calibrated)" \
    --json "$OUT/calibration-tiny-video-shapes.json"
}
quant_attention() {  # int8 attention and the quantized KV cache (README "Quantization: attention and KV cache")
  $PY -m benchmarks.int8_attention --tokens 4096 --repeats 5 --threads 1 --real tiny-video-shapes \
    --json "$OUT/int8-attention-micro.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 3 \
    --methods "int8_attention,int8_attention(smooth_k=false)" --json "$OUT/int8-attention-video-tiny-video-shapes.json"
  $PY -m benchmarks.kv_quant --windows 2 --speed-tokens 0 --threads 1 --json "$OUT/kvquant-tiny-code-llama.json"
  $PY -m benchmarks.kv_quant --skip-perplexity --speed-tokens 448 --threads 1 \
    --json "$OUT/kvquant-decode-speed-tiny-code-llama.json"
}
quant() {  # issue 18: weight quantization on every bundled model (text rows add held-out perplexity)
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 2 --prompts 2 --prompt-kind code \
    --max-new-tokens 96 \
    --methods "weight_quant,dynamic_quant,weight_quant(weights=int4, skip_blocks=0, skip_io=false),awq(skip_blocks=0, skip_io=false)" \
    --json "$OUT/quant-text-tiny-code-llama.json"
  $PY -m benchmarks --modality text --model tiny-code-llama --threads 1 --repeats 3 --prompts 3 --prompt-kind code \
    --max-new-tokens 96 --methods "weight_quant,dynamic_quant" --json "$OUT/quant-text-int8-tiny-code-llama.json"
  $PY -m benchmarks --modality image --model tiny-sd-shapes --threads 1 --repeats 2 --prompts 6 --steps 25 --guidance 5 \
    --methods "weight_quant,deepcache(interval=3),weight_quant+deepcache(interval=3)" --json "$OUT/quant-image-tiny-sd-shapes.json"
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 6 --steps 25 --guidance 5 \
    --methods "weight_quant" --json "$OUT/quant-image-tiny-flux-shapes.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 12 \
    --params '{"steps": 25, "guidance": 3.0}' --methods "weight_quant" --json "$OUT/quant-video-tiny-video-shapes.json"
  $PY -m benchmarks --modality audio --model tiny-audio-synth --threads 1 --repeats 2 --prompts 6 \
    --params '{"steps": 25, "guidance": 3.0}' --methods "weight_quant" --json "$OUT/quant-audio-tiny-audio-synth.json"
}
# ./readme_tables.sh [text|image|arimage|video|audio|ideal|calibration|quant|quant_attention|textseeds|textlossy|textctx ...]: the named series only (default: all,
# two at a time, one thread each), then the tables from every JSON present.
series=("$@")
[ ${#series[@]} -eq 0 ] && series=(text image video audio ideal)  # ideal last, alone: it times Compare too
for ((i = 0; i < ${#series[@]}; i += 2)); do
  for name in "${series[@]:i:2}"; do "$name" > "$OUT/$name.log" 2>&1 & done
  wait
done
$PY -m benchmarks.report "$OUT"/{image,video,audio,text,overhead,textseeds,textlossy,textctx}-*.json
$PY -m benchmarks.report --ideal "$OUT"/ideal-*.json
$PY -m benchmarks.report --calibration "$OUT"/calibration-*.json
if compgen -G "$OUT/quant-*.json" > /dev/null; then $PY -m benchmarks.report "$OUT"/quant-*.json; fi
