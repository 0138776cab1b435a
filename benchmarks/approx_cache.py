"""Approximate caching (Nirvana) on a stream of prompts with repeats and near-repeats.

``python -m benchmarks.approx_cache --model tiny-sd-shapes --threads 1 --repeats 2 --json FILE``

The method only pays when earlier runs are kept, so the stream is served in order, as a
user would send it: for each prompt, the baseline and approx_cache are timed against each
other by the measurement engine (``studio.measure``: warm-up, interleaved, median of
paired ratios), with runs that retrieve from the history but keep nothing (the studio's
``warm_up``), so a repetition never finds its own earlier repetition; then the prompt is
served once with approx_cache (``Studio.generate``), which keeps its latents for the
prompts after it. Each prompt has its own seed, as separate requests would.

Reported: per prompt, the speedup, the similarity and K of the reuse; over the stream, the
mean speedup, the hit rate, and the adherence of the baseline and approx_cache outputs
(the bundled shapes classifier) with the PSNR of each reuse against its baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

# near-repeats (an extra word), exact repeats, and changes of one attribute
STREAM = [
    "a red circle at top left on white",
    "a red circle at the top left on white",
    "a blue square at bottom right on black",
    "a red circle at top left on white",
    "a blue square at the bottom right on black",
    "a green triangle at top right on white",
    "a blue circle at top left on white",
    "a green triangle at top right on white",
    "a yellow circle at bottom left on black",
    "a red square at top left on white",
    "a yellow circle at the bottom left on black",
    "a green triangle at the top right on white",
    "a blue square at bottom right on black",
    "a red circle at top left on black",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd-shapes")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=len(STREAM), help="the first N prompts of the stream")
    parser.add_argument("--params", default="{}", help="approx_cache parameters as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    return parser


def serve_stream(studio, model: str, prompts: list[str], params: dict, method_params: dict, repeats: int,
                 log=print) -> list[dict]:
    """Per prompt of the stream: the measured pair, then one kept approx_cache run."""
    from backends.types import MethodChoice, Request
    from studio.measure import Timed, measure, summarize

    rows = []
    for index, prompt in enumerate(prompts):
        requests = [Request("image", model, prompt, seed=index, params=params),
                    Request("image", model, prompt, seed=index, params=params,
                            methods=[MethodChoice("approx_cache", dict(method_params, store=False))])]

        def run(config: int, _case: int) -> Timed:
            result = studio.warm_up(requests[config])
            return Timed(result.total_seconds, result, None, result.device)

        measured = measure(2, 1, run, repeats=repeats, warm=lambda c, _: studio.warm_up(requests[c]))
        summary = summarize(measured)[1]
        base, approx = (runs.last[0] for runs in measured.runs)
        stats = approx.method_stats["approx_cache"]
        studio.generate(requests[1].replace(methods=[MethodChoice("approx_cache", dict(method_params))]))
        rows.append({"prompt": prompt, "seed": index, "speedup": round(summary.speedup.median, 3),
                     "speedup_range": [round(summary.speedup.low, 3), round(summary.speedup.high, 3)],
                     "reused": stats["reused"], "similarity": stats["similarity"],
                     "skipped_steps": stats["skipped_steps"], "base_output": base.output,
                     "approx_output": approx.output})
        log(f"{index + 1:2d}. {prompt:45s} {rows[-1]['speedup']:.2f}x  K={stats['skipped_steps']:2d}  "
            f"similarity={stats['similarity']}")
    return rows


def quality(model: str, rows: list[dict]) -> dict:
    from studio.metrics import psnr, task_score

    prompts = [r["prompt"] for r in rows]
    base = task_score("image", model, [r["base_output"] for r in rows], prompts) or {}
    approx = task_score("image", model, [r["approx_output"] for r in rows], prompts) or {}
    reused = [r for r in rows if r["reused"]]
    return {
        "adherence_baseline": round(100 * base.get("all", float("nan")), 1),
        "adherence_approx_cache": round(100 * approx.get("all", float("nan")), 1),
        "psnr_reused_vs_baseline_db": round(statistics.median(
            psnr(r["base_output"], r["approx_output"]) for r in reused), 2) if reused else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from backends.manager import BackendManager
    from studio.service import Studio

    params = {"steps": args.steps, "guidance": args.guidance}
    with tempfile.TemporaryDirectory() as data_dir:
        studio = Studio(data_dir=data_dir, manager=BackendManager(device=args.device))
        try:
            rows = serve_stream(studio, args.model, STREAM[:args.prompts], params, json.loads(args.params),
                                args.repeats)
        finally:
            studio.close()
    speedups = [r["speedup"] for r in rows]
    report = {
        "benchmark": "approx_cache stream", "model": args.model, "params": params,
        "method_params": json.loads(args.params), "repeats": args.repeats, "threads": args.threads,
        "device": args.device, "load_average": [round(x, 2) for x in os.getloadavg()],
        "mean_speedup": round(statistics.mean(speedups), 3),
        "hit_rate": round(sum(r["reused"] for r in rows) / len(rows), 3),
        **quality(args.model, rows),
        "stream": [{k: v for k, v in r.items() if not k.endswith("_output")} for r in rows],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "stream"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
