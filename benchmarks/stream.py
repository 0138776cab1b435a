"""Frames per second of the Stream mode: plain img2img with CFG vs the StreamDiffusion engine.

    python -m benchmarks.stream --model tiny-sd-shapes --threads 1 --repeats 2 \\
        --json benchmarks/results/stream-tiny-sd-shapes.json

One case is the whole bundled frame sequence (``studio.streaming.demo_frames``: a red
circle moving right, then near-still frames). The configurations, timed by the one
measurement engine (``studio.measure``: warm-up, interleaved, median of paired ratios):

0. ``img2img + CFG``: diffusers' img2img pipeline per frame (``ImageBackend``), the
   negative pass every step: the baseline;
1. ``sequential``: our engine, one frame at a time, negative pass every step (the same
   sampler as 0: it checks the engine costs nothing by itself);
2. ``sequential + RCFG self``; 3. ``stream batch``; 4. ``stream batch + RCFG self``;
5. ``stream batch + RCFG onetime``; 6. ``StreamDiffusion``: stream batch + RCFG self +
   the similarity filter.

Quality: mean PSNR of each configuration's frames against the baseline's and against the
sequential engine's (same seed, same noise), and prompt adherence of the frames
(``backends.tiny.shapes.score_images``: shape, colour and position all right).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

CONFIGS: list[tuple[str, dict | None]] = [
    ("img2img + CFG (diffusers, per frame)", None),
    ("sequential", {"stream_batch": False, "rcfg": "none", "similarity_filter": False}),
    ("sequential + RCFG self", {"stream_batch": False, "rcfg": "self", "similarity_filter": False}),
    ("stream batch", {"stream_batch": True, "rcfg": "none", "similarity_filter": False}),
    ("stream batch + RCFG self", {"stream_batch": True, "rcfg": "self", "similarity_filter": False}),
    ("stream batch + RCFG onetime", {"stream_batch": True, "rcfg": "onetime", "similarity_filter": False}),
    ("StreamDiffusion (batch + RCFG self + filter)", {"stream_batch": True, "rcfg": "self",
                                                     "similarity_filter": True}),
]
PAPER = {  # the paper's own figures (SD-turbo / LCM on an RTX 4090, TensorRT), for the README beside ours
    "stream batch": "about 1.5x vs sequential denoising, at different denoising levels",
    "RCFG self": "up to 2.05x vs conventional CFG",
    "similarity filter": "energy 2.39x lower on an RTX 3060, 1.99x on an RTX 4090 (the whole pipeline)",
    "StreamDiffusion": "91.07 fps img2img on an RTX 4090 (with TensorRT and a tiny VAE), 59.56x over diffusers AutoPipeline",
}


def run(model: str, prompt: str, steps: int, strength: float, guidance: float, repeats: int, seed: int) -> dict:
    from backends.image import ImageBackend
    from backends.catalog import resolve_source
    from backends.img2img import image_to_data_url
    from backends.stream import StreamSession, stream_config
    from backends.tiny.shapes import score_images
    from backends.types import Request
    from studio.measure import Timed, measure, summarize
    from studio.metrics import psnr
    from studio.streaming import demo_frames, fit_frames

    backend = ImageBackend.from_pretrained(model, resolve_source(model), torch.device("cpu"), torch.float32)
    height, width = backend.default_size()
    frames = fit_frames(demo_frames(), height, width)
    stats: dict[int, dict] = {}

    def one(config: int, _case: int) -> Timed:
        options = CONFIGS[config][1]
        start = time.perf_counter()
        if options is None:
            out = []
            for frame in frames:
                params = {"steps": steps, "guidance": guidance, "strength": strength,
                          "init_image": image_to_data_url(frame)}
                out.append(backend.run(Request("image", model, prompt, seed=seed, params=params)).output)
        else:
            session = StreamSession(backend.pipe, prompt, "", seed=seed, steps=steps, strength=strength,
                                    guidance=guidance, height=height, width=width, config=stream_config(options))
            out = session.run(frames)
            stats[config] = session.stats.as_dict()
        return Timed(time.perf_counter() - start, out, device="cpu")

    labels = [name for name, _ in CONFIGS]
    measurement = measure(len(CONFIGS), 1, one, repeats=repeats, warm=one, labels=labels,
                          progress=lambda d, t, s: print(f"  [{d}/{t}] {s}", flush=True))
    summaries = summarize(measurement)
    base_frames = measurement.runs[0].last[0]
    sequential_frames = measurement.runs[1].last[0]
    rows = []
    for index, (runs, summary) in enumerate(zip(measurement.runs, summaries)):
        out = runs.last.get(0)
        seconds = summary.seconds
        rows.append({
            "config": labels[index], "options": CONFIGS[index][1],
            "seconds_median": round(seconds, 4) if seconds else None,
            "fps": round(len(frames) / seconds, 3) if seconds else None,
            "speedup": asdict(summary.speedup) if summary.speedup else None,
            "psnr_vs_baseline": round(statistics.mean(psnr(a, b) for a, b in zip(base_frames, out)), 2),
            "psnr_vs_sequential": round(statistics.mean(psnr(a, b) for a, b in zip(sequential_frames, out)), 2),
            "adherence": score_images(out, [prompt] * len(out)),
            "stream": stats.get(index), "error": runs.error,
        })
    return {"model": model, "prompt": prompt, "frames": len(frames), "size": [height, width], "steps": steps,
            "strength": strength, "denoising_steps_per_frame": min(int(steps * strength), steps),
            "guidance": guidance, "seed": seed, "repeats": repeats, "threads": torch.get_num_threads(),
            "load_average": _load(), "rows": rows, "paper": PAPER}


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"loadavg {os.getloadavg()}"


def print_table(report: dict) -> None:
    print(f"\n{report['model']}: {report['frames']} frames, {report['denoising_steps_per_frame']} denoising steps "
          f"per frame, guidance {report['guidance']}")
    print(f"{'config':48} {'fps':>7} {'speedup':>16} {'PSNR/base':>10} {'PSNR/seq':>9} {'adh':>6}")
    for row in report["rows"]:
        sp = row["speedup"]
        speed = f"{sp['median']:.2f}x ({sp['low']:.2f}-{sp['high']:.2f})" if sp else "-"
        print(f"{row['config']:48} {row['fps'] or 0:7.2f} {speed:>16} {row['psnr_vs_baseline']:10.2f} "
              f"{row['psnr_vs_sequential']:9.2f} {row['adherence']['all']:6.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sd-shapes")
    parser.add_argument("--prompt", default="a blue square at bottom right on black")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args.model, args.prompt, args.steps, args.strength, args.guidance, args.repeats, args.seed)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
