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
  # the diffusion LM (issue 21): LLaDA decoding, 64 tokens in 64 steps, blocks of 32
  $PY -m benchmarks --modality text --model tiny-code-dllm --threads 1 --repeats 2 --prompts 3 --prompt-kind code \
    --max-new-tokens 64 --params '{"max_new_tokens": 64, "steps": 64, "block_length": 32}' \
    --methods "fast_dllm(threshold=1.0, cache=none),fast_dllm(cache=none),fast_dllm(threshold=1.0, cache=prefix),fast_dllm(threshold=1.0, cache=dual),fast_dllm,fast_dllm(threshold=0.7),dkv_cache,dkv_cache(refresh_interval=8)" \
    --json "$OUT/text-code-tiny-code-dllm.json"
  $PY -m benchmarks --modality text --model tiny-code-dllm --threads 1 --repeats 2 --prompts 3 --prompt-kind edit \
    --max-new-tokens 64 --params '{"max_new_tokens": 64, "steps": 64, "block_length": 32}' \
    --methods "fast_dllm(threshold=1.0, cache=prefix),fast_dllm(threshold=1.0),fast_dllm,dkv_cache" \
    --json "$OUT/text-edit-tiny-code-dllm.json"
  for kind in code edit; do  # 128 tokens in 128 steps: four blocks, where the block caches save more
    $PY -m benchmarks --modality text --model tiny-code-dllm --threads 1 --repeats 2 --prompts 3 --prompt-kind $kind \
      --max-new-tokens 128 --params '{"max_new_tokens": 128, "steps": 128, "block_length": 32}' \
      --methods "fast_dllm(threshold=1.0),fast_dllm,dkv_cache" --json "$OUT/text-${kind}128-tiny-code-dllm.json"
  done
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
multires() {  # bottleneck_sampling and ralu (issue 19 items 3 and 4)
  local r7="steps_low=2, steps_mixed=3, steps_full=5, end_low=0.2, end_mixed=0.3, shift_low=8.141, shift_mixed=2.856, shift_full=2.193, z=6.261, up_ratio=0.1"
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 6 --steps 25 --guidance 5 \
    --methods "bottleneck_sampling,bottleneck_sampling(positions=scaled),ralu,ralu($r7),ralu($r7, positions=scaled),ralu(positions=scaled, steps_low=3, steps_mixed=3, steps_full=6, end_low=0.2, end_mixed=0.3),sampler(steps=12)" \
    --json "$OUT/multires-tiny-flux-shapes.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 4 \
    --methods "bottleneck_sampling,bottleneck_sampling(positions=scaled),bottleneck_sampling(positions=scaled, renoise=4),bottleneck_sampling(positions=scaled, low_start=0.1, low_end=0.9),sampler(steps=12)" \
    --json "$OUT/multires-tiny-video-shapes.json"
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 8 --seed 11 --steps 25 --guidance 5 \
    --methods "ralu($r7),ralu($r7, positions=scaled),sampler(steps=10)" --json "$OUT/multires-ralu7x-tiny-flux-shapes-seed11.json"
}
approx_cache() {  # a stream of prompts served in order (benchmarks/approx_cache.py), and the cost of a miss
  for model in tiny-sd-shapes tiny-flux-shapes; do
    $PY -m benchmarks.approx_cache --model $model --threads 1 --repeats 2 --json "$OUT/approx_cache-$model.json"
  done
  $PY -m benchmarks.approx_cache --model tiny-flux-shapes --threads 1 --repeats 2 --params '{"max_skip": 0.3}' \
    --json "$OUT/approx_cache-tiny-flux-shapes-max_skip-0.3.json"
  $PY -m benchmarks --modality image --model tiny-sd-shapes --threads 1 --repeats 2 --prompts 4 \
    --methods "approx_cache" --json "$OUT/approx_cache-miss-tiny-sd-shapes.json"
}
rasbac() {  # issue 19 items 2 and 5: RAS and BAC on the bundled DiTs (BAC also the UNet)
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 4 --steps 25 --guidance 5 \
    --methods "ras,ras(sample_ratio=0.25),ras(sample_ratio=0.25, focus=low)" --json "$OUT/ras-tiny-flux-shapes.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 6 \
    --params '{"steps": 25, "guidance": 3.0}' \
    --methods "ras,ras(sample_ratio=0.25),ras(sample_ratio=0.25, focus=low),ras(sample_ratio=0.25, cache_kv=false)" \
    --json "$OUT/ras-tiny-video-shapes.json"
  $PY -m benchmarks --modality image --model tiny-flux-shapes --threads 1 --repeats 2 --prompts 4 --steps 25 --guidance 5 \
    --methods "ras(focus=low),ras(sample_ratio=0.25, focus=low),bac,bac(update_ratio=0.2)" \
    --json "$OUT/rasbac-tiny-flux-shapes.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 6 \
    --params '{"steps": 25, "guidance": 3.0}' \
    --methods "ras(focus=low),ras(sample_ratio=0.25, focus=low),bac,bac(update_ratio=0.2)" \
    --json "$OUT/rasbac-tiny-video-shapes.json"
  $PY -m benchmarks --modality image --model tiny-sd-shapes --threads 1 --repeats 2 --prompts 4 --steps 25 --guidance 5 \
    --methods "bac,bac(update_ratio=0.2)" --json "$OUT/rasbac-tiny-sd-shapes.json"
  $PY -m benchmarks --modality video --model tiny-video-shapes --threads 1 --repeats 2 --prompts 6 \
    --params '{"steps": 25, "guidance": 3.0}' --methods "bac(update_ratio=0.25, bubble_top_k=4)" \
    --json "$OUT/bac-confirm-tiny-video-shapes.json"
}
# ./readme_tables.sh [text|image|video|audio|ideal|calibration|quant|quant_attention|textseeds|textlossy|textctx|multires|approx_cache|rasbac|arimage ...]: the named series only (default: all,
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
if compgen -G "$OUT/multires-*.json" > /dev/null; then $PY -m benchmarks.report "$OUT"/multires-*.json; fi
if compgen -G "$OUT/ras*-*.json" > /dev/null; then $PY -m benchmarks.report "$OUT"/ras*-tiny-*.json "$OUT"/bac-*.json; fi
