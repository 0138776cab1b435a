"""KV-cache quantization on the bundled code model: bytes held and held-out perplexity.

``python -m benchmarks.kv_quant --windows 2 --threads 1 --json benchmarks/results/kvquant-tiny-code-llama.json``

For each configuration (plain ``DynamicCache``, then ``kv_quant`` caches at several bit
widths) and each held-out window of 1,001 tokens of the model's corpus (CPython stdlib
files the model never trained on: every 20th file, ``backends.tiny.text_models``):

- the first ``--prefill`` tokens go in one forward (the prompt), then the rest one token
  per forward through the cache, teacher-forced: each step predicts the next held-out
  token from quantized past keys and values, as decoding would. The negative
  log-likelihood of those step predictions (the same positions for every
  configuration) gives the perplexity and its delta against the plain cache. A single
  full-sequence forward would not do: its attention uses the fresh full-precision keys,
  so a quantized cache would change nothing.
- the bytes the cache object holds (``backends.accel.kv_quant.cache_bytes``: packed
  integers, scales, zero points and the full-precision residual) when it holds 512 and
  1,000 tokens (the model takes 1,024 positions).

Decode speed (``--speed-tokens N``, 0 to skip): greedy ``generate`` of exactly N new tokens
(EOS ignored, so every configuration decodes the same number of tokens: the studio's
benchmark stops at EOS, and a quantized cache that ends a text early looks "faster")
after a 64-token held-out prompt, through ``studio.measure`` (warm-up, interleaved runs,
median of paired ratios ``plain_seconds / quantized_seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from backends.accel.kv_quant import cache_bytes, make_quantized_cache

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-code-llama"
CHECKPOINTS = (512, 1000)
WINDOW = 1001  # 1,000 tokens in the cache, and the token after them to predict


def heldout_windows(tokenizer, count: int) -> list[torch.Tensor]:
    """``count`` non-overlapping windows of the held-out token stream."""
    from backends.tiny.text_models import encode_files, stdlib_files

    _, heldout = stdlib_files()
    stream = encode_files(tokenizer, heldout[: 8 * count])
    return [stream[i * WINDOW: (i + 1) * WINDOW] for i in range(min(count, len(stream) // WINDOW))]


def make_cache(model, config: dict):
    from transformers import DynamicCache

    if config["bits"] is None:
        return DynamicCache(config=model.config)
    return make_quantized_cache(model, config["bits"], config["group_size"], config["residual_length"])


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, config: dict, prefill: int) -> dict:
    """Summed NLL of the step predictions and the cache bytes at each checkpoint."""
    cache = make_cache(model, config)
    model(input_ids=ids[None, :prefill], cache=cache, use_cache=True)
    nll, count, held = 0.0, 0, {}
    for position in range(prefill, len(ids) - 1):
        logits = model(input_ids=ids[None, position: position + 1], cache=cache, use_cache=True).logits[0, -1]
        nll -= torch.log_softmax(logits.float(), dim=-1)[ids[position + 1]].item()
        count += 1
        if cache.get_seq_length() in CHECKPOINTS:
            held[cache.get_seq_length()] = cache_bytes(cache)
    return {"nll": nll, "count": count, "bytes": held}


def decode_speed(model, prompts: list[torch.Tensor], configs: list[dict], new_tokens: int, repeats: int) -> list:
    """Median paired speed ratios of fixed-length greedy decoding, per configuration."""
    from transformers import GenerationConfig

    from studio.measure import Measurement, Timed, measure, summarize

    settings = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=model.config.pad_token_id)

    @torch.inference_mode()
    def one(config: int, case: int) -> Timed:
        ids = prompts[case][None]
        cache = make_cache(model, configs[config])
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings, cache=cache)
        seconds = time.perf_counter() - start
        assert out.shape[-1] == ids.shape[-1] + new_tokens
        return Timed(seconds, result=out[0, ids.shape[-1]:].tolist(), device="cpu")

    measurement: Measurement = measure(len(configs), len(prompts), one, repeats=repeats, warm=one)
    base = measurement.runs[0].last
    rows = []
    for config, runs, summary in zip(configs, measurement.runs, summarize(measurement)):
        agree = [next((i for i, (a, b) in enumerate(zip(runs.last[c], base[c])) if a != b), new_tokens)
                 for c in range(len(prompts))]
        rows.append({"name": config["name"], "seconds_median": round(summary.seconds, 3),
                     "speedup": round(summary.speedup.median, 3),
                     "speedup_min": round(summary.speedup.low, 3), "speedup_max": round(summary.speedup.high, 3), "pairs": len(runs.trials),
                     "tokens_before_first_divergence": agree})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(configs: list[dict], windows: int, prefill: int, speed_tokens: int = 0, speed_repeats: int = 2,
        skip_perplexity: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    texts = heldout_windows(tokenizer, windows)
    rows = []
    for config in [] if skip_perplexity else configs:
        start = time.perf_counter()
        results = [teacher_forced(model, ids, config, prefill) for ids in texts]
        nll = sum(r["nll"] for r in results) / sum(r["count"] for r in results)
        rows.append({**config, "perplexity": round(math.exp(nll), 4), "mean_nll": round(nll, 5),
                     "bytes": {str(n): results[0]["bytes"].get(n) for n in CHECKPOINTS},
                     "loop_seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    speed = []
    if speed_tokens:
        picked = [c for c in configs if c["bits"] in (None, 4, 8)]
        speed = decode_speed(model, [ids[:64] for ids in texts], picked, speed_tokens, speed_repeats)
    plain = rows[0] if rows else None
    for row in rows[1:]:
        row["perplexity_delta_pct"] = round(100 * (row["perplexity"] / plain["perplexity"] - 1), 3)
        row["compression"] = {n: round(plain["bytes"][n] / row["bytes"][n], 3) for n in plain["bytes"]}
    return {
        "what": "tiny-code-llama (float32, 12 layers x 4 KV heads x 64): KV-cache bytes held and teacher-forced "
                "held-out perplexity, plain DynamicCache vs kv_quant (transformers QuantizedCache, HQQ, keys per "
                "channel / values per token)",
        "heldout": f"{len(texts)} windows of {WINDOW} tokens, CPython stdlib every 20th file; prompt of {prefill} "
                   f"tokens, {len(texts[0]) - 1 - prefill} teacher-forced steps each",
        "threads": torch.get_num_threads(),
        "rows": rows,
        "decode_speed": {
            "what": f"greedy generate of exactly {speed_tokens} new tokens after a 64-token held-out prompt "
                    f"(EOS ignored), studio.measure: median of paired ratios plain/quantized, "
                    f"{speed_repeats} repeats x {len(texts)} prompts",
            "rows": speed,
        } if speed else None,
    }


CONFIGS = [
    {"name": "plain", "bits": None},
    {"name": "kv_quant(bits=8)", "bits": 8, "group_size": 64, "residual_length": 64},
    {"name": "kv_quant (bits=4, default)", "bits": 4, "group_size": 64, "residual_length": 64},
    {"name": "kv_quant(bits=2)", "bits": 2, "group_size": 64, "residual_length": 64},
    {"name": "kv_quant(bits=2, group_size=32, residual_length=128) (KIVI-2)", "bits": 2, "group_size": 32,
     "residual_length": 128},
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_quant", description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--speed-tokens", type=int, default=448, help="new tokens per timed decode (0: skip)")
    parser.add_argument("--speed-repeats", type=int, default=2)
    parser.add_argument("--skip-perplexity", action="store_true", help="only the decode speed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(CONFIGS, args.windows, args.prefill, args.speed_tokens, args.speed_repeats,
                 skip_perplexity=args.skip_perplexity)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
