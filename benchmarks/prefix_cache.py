"""``python -m benchmarks.prefix_cache``: time to first token with a long shared prefix.

Requests share a ``--prefix-tokens`` system prompt (a stdlib file's first tokens, the
kind of few-shot context a code assistant sends every time) and differ in their suffix:
each (prompt, repetition) gets its own ``# request N`` line, so a later request shares only
the prefix with earlier ones, never its whole prompt. Baseline and prefix cache run the
same requests through ``studio.measure`` (warm-up, interleaved, median of paired ratios);
the timed figure is the time to first token. The prefix cache's warm-up run is the one
that stores the prefix; every timed run after it reuses it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

import torch

from backends.manager import BackendManager
from backends.types import MethodChoice, Request
from benchmarks.prompts import CODE_PROMPTS
from studio.measure import Timed, measure, summarize


def shared_prefix(tokenizer, tokens: int) -> str:
    """The first ``tokens`` tokens of a stdlib module, as text that re-encodes to them."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    text = tokenizer.decode(tokenizer(source, add_special_tokens=False).input_ids[:tokens])
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache", description=__doc__)
    parser.add_argument("--model", default="tiny-code-llama")
    parser.add_argument("--prefix-tokens", type=int, default=768)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manager = BackendManager(device="cpu")
    backend = manager.get("text", args.model)
    prefix = shared_prefix(backend.tokenizer, args.prefix_tokens)
    methods = [[], [MethodChoice("prefix_cache", {})]]
    calls: dict[tuple[int, int], int] = defaultdict(int)
    outputs: dict[tuple[int, int, int], list[int]] = {}
    ttft: dict[int, list[float]] = defaultdict(list)

    def request(config: int, case: int) -> tuple[Request, int]:
        n = calls[config, case]
        calls[config, case] += 1
        prompt = f"# request {case}-{n}\n{CODE_PROMPTS[case]}"
        params = {"max_new_tokens": args.max_new_tokens, "system_prompt": prefix}
        return Request("text", args.model, prompt, seed=0, params=params, methods=methods[config]), n

    def run(config: int, case: int) -> Timed:
        req, n = request(config, case)
        result = backend.run(req)
        outputs[config, case, n] = result.extra["output_token_ids"]
        ttft[config].append(result.extra["time_to_first_token_s"])
        return Timed(result.extra["time_to_first_token_s"], result, None, result.device)

    def warm(config: int, case: int) -> None:
        backend.run(request(config, case)[0])

    measured = measure(2, len(CODE_PROMPTS), run, repeats=args.repeats, warm=warm,
                       labels=["baseline", "prefix_cache"])
    summary = summarize(measured)[1]
    exact = all(outputs[1, c, n] == outputs[0, c, n] for (cfg, c, n) in outputs if cfg == 1 and (0, c, n) in outputs)
    last = measured.runs[1].last[0]
    base_ms, cached_ms = (1000 * statistics.median(ttft[c]) for c in (0, 1))
    base_row = {"method": "baseline (time to first token)", "params": [], "seconds_median": round(base_ms / 1000, 4),
                "speedup": 1.0, "speedup_min": 1.0, "speedup_max": 1.0, "lossless": None, "quality": {},
                "all_exact": True}
    row = {
        "method": "prefix_cache (time to first token)",
        "params": [{"name": "prefix_cache", "params": {}}],
        "seconds_median": round(cached_ms / 1000, 4),
        "speedup": round(summary.speedup.median, 3),
        "speedup_min": round(summary.speedup.low, 3),
        "speedup_max": round(summary.speedup.high, 3),
        "pairs": summary.speedup.pairs,
        "lossless": True,
        "quality": {},
        "prefix_tokens": args.prefix_tokens,
        "prompt_tokens": last.extra["prompt_tokens"],
        "baseline_ttft_ms": round(base_ms, 2),
        "cached_ttft_ms": round(cached_ms, 2),
        "all_exact": exact,
        "method_stats": last.method_stats,
    }
    meta = {"modality": "text", "model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "prompts": len(CODE_PROMPTS), "max_new_tokens": args.max_new_tokens, "device": str(manager.device),
            "timed": "time to first token",
            "command": "python -m benchmarks.prefix_cache " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(row, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [base_row, row]}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
