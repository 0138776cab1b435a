"""``python -m benchmarks.story --text-model tiny-code-llama --image-model tiny-sd-shapes``

The whole story (plan + every step's text and image) with and without accelerations,
interleaved in one process; prints per-stage seconds and the speedup of each stage.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from studio.compare import parse_config


def main(argv=None) -> int:
    from backends.manager import BackendManager
    from studio.service import Studio
    from studio.story import StoryRequest, run_story

    parser = argparse.ArgumentParser(prog="python -m benchmarks.story")
    parser.add_argument("--text-model", default="tiny-code-llama")
    parser.add_argument("--image-model", default="tiny-sd-shapes")
    parser.add_argument("--text-methods", default="prompt_lookup")
    parser.add_argument("--image-methods", default="deepcache(interval=3)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    manager = BackendManager(device="auto")
    if "dummy" in args.text_model + args.image_model:
        from backends.tiny.dummy import register_dummy_models

        register_dummy_models(manager)
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(data_dir=tmp, manager=manager)
        plain = StoryRequest("a 4-step how-to: drawing shapes", args.text_model, args.image_model, args.steps,
                             max_new_tokens=args.max_new_tokens)
        fast = StoryRequest(plain.request, args.text_model, args.image_model, args.steps,
                            text_methods=parse_config(args.text_methods).methods,
                            image_methods=parse_config(args.image_methods).methods,
                            max_new_tokens=args.max_new_tokens)
        run_story(studio, plain)  # warm-up: loads both models
        timings = {"baseline": [], "accelerated": []}
        for _ in range(args.repeats):
            timings["baseline"].append(run_story(studio, plain).timings)
            timings["accelerated"].append(run_story(studio, fast).timings)
        studio.close()
    print(f"story of {args.steps} steps; accelerated = text {args.text_methods} + image {args.image_methods}")
    print("stage    | baseline s | accelerated s | speedup")
    for stage in ("text", "images", "total"):
        base = statistics.median(t[stage] for t in timings["baseline"])
        acc = statistics.median(t[stage] for t in timings["accelerated"])
        print(f"{stage:8s} | {base:10.3f} | {acc:13.3f} | {base / acc:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
