"""``python -m benchmarks.context_reuse``: time to first token on long prompts made of
documents, for context-chunk reuse (``chunk_cache``) and prompt compression
(``prompt_compress``).

Each case is a retrieval-style prompt: ``--docs`` top-level functions of stdlib modules
(60-180 tokens each, their own per case), separated by blank lines, then a question (a
bundled code prompt). The warm-up sends every case once with its documents in order, on an
empty chunk store (what stores their chunks; its time to first token is ``cold_ttft_s``); every timed request sends the same documents in another order (a
new permutation per repetition, the same for every configuration), so chunk reuse finds
every chunk kept but never the prompt's prefix. All configurations run the same requests
through ``studio.measure`` (interleaved, median of paired ratios); the timed figure is the
time to first token, and the same runs' total seconds give a second set of paired ratios.

Quality: both methods are lossy; their output is compared with the baseline's for the
same request (tokens before the first divergence, token agreement, exact match). Held-out
perplexity is not reported: neither changes the model, only what it reads.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from backends.manager import BackendManager
from backends.types import Request
from benchmarks.cli import parse_methods
from benchmarks.prompts import CODE_PROMPTS
from studio.measure import Measurement, Timed, measure, summarize

MODULES = ("posixpath", "shlex", "textwrap", "fnmatch", "glob", "genericpath", "copy", "bisect")
DEFAULT_METHODS = "chunk_cache,chunk_cache(recompute=0.3),prompt_compress,prompt_compress(keep=0.4)"


def documents(tokenizer, low: int = 60, high: int = 180) -> list[str]:
    """Top-level functions of ``MODULES`` whose length is ``low``..``high`` tokens."""
    out = []
    for name in MODULES:
        source = inspect.getsource(__import__(name))
        for part in re.split(r"\n(?=def )", source):
            if part.startswith("def "):
                text = part.split("\n\n\n")[0].strip("\n")
                if low <= len(tokenizer(text, verbose=False).input_ids) <= high:
                    out.append(text)
    return out


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def speed(spread) -> dict:
    return {"speedup": round(spread.median, 3), "speedup_min": round(spread.low, 3),
            "speedup_max": round(spread.high, 3), "pairs": spread.pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_reuse", description=__doc__)
    parser.add_argument("--model", default="tiny-code-llama")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="configurations, Compare's syntax")
    parser.add_argument("--docs", type=int, default=7, help="documents per prompt (7: ~800 tokens)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manager = BackendManager(device="cpu")
    backend = manager.get("text", args.model)
    pool = documents(backend.tokenizer)
    if len(pool) < args.docs * args.cases:
        parser.error(f"only {len(pool)} documents for {args.cases} cases of {args.docs}")
    docs = [pool[c * args.docs:(c + 1) * args.docs] for c in range(args.cases)]
    configs = parse_methods(args.methods)
    methods = [[]] + [c.methods for c in configs]
    labels = ["baseline"] + [c.label for c in configs]
    calls: dict[tuple[int, int], int] = defaultdict(int)
    outputs: dict[tuple[int, int, int], list[int]] = {}
    totals: dict[tuple[int, int, int], float] = {}
    ttft: dict[int, list[float]] = defaultdict(list)
    cold: dict[int, list[float]] = defaultdict(list)
    prompt_tokens: list[int] = []

    def request(config: int, case: int, n: int) -> Request:
        order = list(range(args.docs))
        if n:
            random.Random(f"{case}-{n}").shuffle(order)
        prompt = "\n\n\n".join(docs[case][i] for i in order) + "\n\n\n" + CODE_PROMPTS[case % len(CODE_PROMPTS)]
        params = {"max_new_tokens": args.max_new_tokens}
        return Request("text", args.model, prompt, seed=0, params=params, methods=methods[config])

    def run(config: int, case: int) -> Timed:
        calls[config, case] += 1
        n = calls[config, case]
        result = backend.run(request(config, case, n))
        outputs[config, case, n] = result.extra["output_token_ids"]
        totals[config, case, n - 1] = result.total_seconds
        ttft[config].append(result.extra["time_to_first_token_s"])
        if config == 0:
            prompt_tokens.append(result.extra["prompt_tokens"])
        return Timed(result.extra["time_to_first_token_s"], result, None, result.device)

    def warm(config: int, case: int) -> None:
        backend.run_memory.pop("chunk_cache", None)  # each configuration's first requests find nothing kept
        for c in range(args.cases):  # every case's chunks: a first request, documents in order
            cold[config].append(backend.run(request(config, c, 0)).extra["time_to_first_token_s"])

    measured = measure(len(methods), args.cases, run, repeats=args.repeats, warm=warm, labels=labels)
    failed = [(labels[r.index], r.error) for r in measured.runs if r.error]
    if failed:
        raise SystemExit("benchmark run failed: " + "; ".join(f"{label}: {error}" for label, error in failed))
    by_total = Measurement([replace(r, trials=[replace(t, seconds=totals[r.index, t.case, t.repeat])
                                               for t in r.trials]) for r in measured.runs], measured.order)
    rows = []
    for config, (first, total) in enumerate(zip(summarize(measured), summarize(by_total))):
        keys = [k for k in outputs if k[0] == config]
        agree = [agreement(outputs[k], outputs[(0, *k[1:])]) for k in keys]
        longest = [max(len(outputs[k]), len(outputs[(0, *k[1:])]), 1) for k in keys]
        last = measured.runs[config].last[0]
        rows.append({
            "method": labels[config] + (" (time to first token)" if config == 0 else ""),
            "params": [m.to_dict() for m in methods[config]],
            "seconds_median": round(statistics.median(ttft[config]), 4),
            **speed(first.speedup),
            "total_seconds_median": round(statistics.median(totals[k] for k in totals if k[0] == config), 4),
            **{f"total_{k}": v for k, v in speed(total.speedup).items()},
            "cold_ttft_s": round(statistics.median(cold[config]), 4),
            "lossless": None if config == 0 else False,
            "quality": {
                "exact_match": round(statistics.mean(a == n for a, n in zip(agree, longest)), 4),
                "token_agreement": round(statistics.mean(a / n for a, n in zip(agree, longest)), 4),
                "first_divergence_mean": round(statistics.mean(agree), 2),
                "first_divergence_min": min(agree),
            },
            "all_exact": all(a == n for a, n in zip(agree, longest)),
            "method_stats": {k: {s: v for s, v in stats.items() if s != "compressed_prompt"}
                             for k, stats in last.method_stats.items()},
        })
    meta = {"modality": "text", "model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "prompts": args.cases, "docs_per_prompt": args.docs, "max_new_tokens": args.max_new_tokens,
            "prompt_tokens_median": statistics.median(prompt_tokens), "device": str(manager.device),
            "timed": "time to first token (total seconds: total_speedup)",
            "command": "python -m benchmarks.context_reuse " + " ".join(sys.argv[1:] if argv is None else argv)}
    for row in rows:
        print(f"{row['method']:45s} ttft {row['seconds_median']:.4f}s {row['speedup']:.2f}x "
              f"({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) total {row['total_speedup']:.2f}x "
              f"cold {row['cold_ttft_s']:.4f}s agree {row['quality']['first_divergence_mean']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
