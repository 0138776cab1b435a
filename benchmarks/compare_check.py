"""``python -m benchmarks.compare_check --json FILE``: does Compare, at its default settings,
report the speedup the benchmark CLI measures?

In one process, on the same prompts and seeds and the same loaded model:

1. **Compare** as the ``/compare`` endpoint runs it: ``studio.compare.run_compare`` with its
   defaults (warm-up, 3 repeats) and the Compare tab's default parameters, one comparison
   per prompt (the tab takes one prompt), each seed the benchmark uses for that prompt;
2. **the benchmark CLI**'s ``run_benchmark`` on all the prompts (default repeats 3).

Both go through ``studio.measure``; the figures differ only by what Compare adds (the
studio's validation, output files, history rows) and by machine noise. The JSON holds
both speedups, each prompt's Compare figure, and whether they agree within ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

from backends.manager import BackendManager
from backends.types import Request
from benchmarks.cli import run_benchmark
from benchmarks.prompts import default_prompts
from studio.compare import parse_config, run_compare


def compare_speedups(manager: BackendManager, model: str, config: str, prompts: list[str], params: dict,
                     seed: int, log) -> list[dict]:
    """One default-settings comparison per prompt, through a Studio on ``manager``."""
    from studio.service import Studio

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(data_dir=tmp, manager=manager)
        try:
            for i, prompt in enumerate(prompts):
                request = Request("image", model, prompt, seed=seed + i, params=params)
                report = run_compare(studio, request, [parse_config(config)])
                row = report.rows[1]
                if row.error:
                    raise RuntimeError(f"compare failed: {row.error}")
                rows.append({"prompt": prompt, "seed": seed + i, "speedup": round(row.speedup, 4),
                             "speedup_min": round(row.speedup_min, 4), "speedup_max": round(row.speedup_max, 4),
                             "ideal_speedup": row.ideal_speedup, "efficiency": row.efficiency})
                log(f"compare, prompt {i + 1}/{len(prompts)}: {row.speedup:.3f}x")
        finally:
            studio.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    from studio.ui.compare import DEFAULT_PARAMS  # the Compare tab's defaults

    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd-shapes")
    parser.add_argument("--config", default="deepcache(interval=3)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="the benchmark CLI's repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    manager = BackendManager(device="cpu")
    params = dict(DEFAULT_PARAMS["image"])
    prompts = default_prompts("image", args.prompts, "mixed", args.seed)
    per_prompt = compare_speedups(manager, args.model, args.config, prompts, params, args.seed, log)
    bench = run_benchmark(manager, "image", args.model, [parse_config(args.config)], prompts, params,
                          args.repeats, args.seed, log=log)[1]
    compare = statistics.median(r["speedup"] for r in per_prompt)
    difference = compare / bench["speedup"] - 1
    result = {
        "meta": {"model": args.model, "config": args.config, "params": params, "prompts": len(prompts),
                 "threads": torch.get_num_threads(), "benchmark_repeats": args.repeats,
                 "compare_settings": "run_compare defaults (warm-up, 3 repeats), one comparison per prompt",
                 "command": "python -m benchmarks.compare_check " + " ".join(sys.argv[1:] if argv is None else argv)},
        "compare_speedup": round(compare, 4),
        "benchmark_speedup": bench["speedup"],
        "benchmark_range": [bench["speedup_min"], bench["speedup_max"]],
        "benchmark_ideal_speedup": bench["ideal_speedup"],
        "benchmark_efficiency": bench["efficiency"],
        "relative_difference": round(difference, 4),
        "within_tolerance": abs(difference) <= args.tolerance,
        "compare_per_prompt": per_prompt,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"compare {compare:.3f}x, benchmark {bench['speedup']:.3f}x: {100 * difference:+.1f}% "
          f"({'within' if result['within_tolerance'] else 'outside'} {100 * args.tolerance:.0f}%)")
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
