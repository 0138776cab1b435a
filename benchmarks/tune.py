"""``python -m benchmarks.tune --modality image --model tiny-sd-shapes --floor "adherence>=-5,psnr>=28"
--trials 40 --prompts 8 --json FILE``

Auto-tune (``studio.tune``) from the command line: searches method configurations on
half of the prompts, then measures the fastest few that met the floor on the other half
(held out), in one interleaved run with the model's shipped presets and each single
method at its defaults. Prints the Pareto front of the search and the held-out table;
``--json`` writes the winner (configuration, methods, tune and held-out speedup with its
range, quality, adherence, device) and everything else measured.

Runs go through a Studio on ``--data-dir`` (default: the studio's own data dir), so they
land in its History and the study in its database (``--db`` for another URL): the same
command with the same ``--study`` (or the same settings) resumes a study.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import torch

from backends.types import StudioError
from studio.presets import SHIPPED_DIR, parse_preset
from studio.tune import TuneResult, describe_winner, run_tune
from studio.tune_spec import TuneSpec


def build_params(args) -> dict[str, Any]:
    params = json.loads(args.params) if args.params else {}
    if args.modality != "text":
        for key in ("steps", "guidance"):
            if getattr(args, key) is not None:
                params.setdefault(key, getattr(args, key))
    elif args.max_new_tokens is not None:
        params.setdefault("max_new_tokens", args.max_new_tokens)
    return params


def spec_from_args(args) -> TuneSpec:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    return TuneSpec(args.modality, args.model, args.floor, prompts=tuple(args.prompt or ()), n_prompts=args.prompts,
                    prompt_kind=args.prompt_kind,
                    params=build_params(args), seed=args.seed, trials=args.trials, minutes=args.minutes,
                    methods=methods, split=args.split, repeats=args.repeats, confirm_top=args.top,
                    compare_singles=not args.no_singles, study=args.study, save_preset=not args.no_save)


def _f(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_rows(header: list[str], lines: list[list[str]]) -> None:
    rows = [header, *lines]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("-|-".join("-" * w for w in widths))


def quality_keys(result: TuneResult) -> list[str]:
    keys = {"image": ["psnr", "ssim"], "video": ["psnr", "ssim"], "audio": ["lsd", "snr"],
            "text": ["exact_match", "token_agreement"]}[result.modality]
    has_adherence = any("adherence" in c.heldout.figures for c in result.confirmed) or \
        any("adherence" in t.quality for t in result.trials)
    has_ppl = any("perplexity_delta_pct" in c.heldout.figures for c in result.confirmed) or \
        any("perplexity_delta_pct" in t.quality for t in result.trials)
    return keys + (["perplexity_delta_pct"] if has_ppl else []) + (["adherence"] if has_adherence else []) + ["exact"]


def print_result(result: TuneResult) -> None:
    keys = quality_keys(result)
    print(f"\nstudy '{result.study}': {len(result.trials)} trials measured, {result.failed} failed "
          f"({result.new_trials} new in this run), floor '{result.floor}', device {result.device}")
    print(f"\nPareto front on the {len(result.tune_prompts)} tune prompt(s) (speedup vs {result.primary}):")
    print_rows(["trial", "config", "speedup", "range", *keys, "meets floor"],
               [[t.number, t.config, _f(t.speedup, "{:.2f}x"), f"{_f(t.speedup_min, '{:.2f}')}-{_f(t.speedup_max, '{:.2f}')}",
                 *[_f(t.quality.get(k)) for k in keys], "yes" if t.feasible else "no"] for t in result.pareto])
    if result.confirmed:
        print(f"\nheld-out confirmation on {len(result.heldout_prompts)} prompt(s), one interleaved run:")
        lines = []
        for c in result.confirmed:
            s = c.heldout.speedup
            lines.append([c.kind, c.label, _f(c.tune.speedup if c.tune else None, "{:.2f}x"),
                          _f(s.median if s else None, "{:.2f}x"),
                          f"{_f(s.low if s else None, '{:.2f}')}-{_f(s.high if s else None, '{:.2f}')}",
                          *[_f(c.heldout.figures.get(k)) for k in keys],
                          "yes" if c.feasible else ("error: " + c.heldout.error if c.heldout.error else "no")])
        print_rows(["kind", "config", "tune", "held-out", "range", *keys, "meets floor"], lines)
    w = result.winner
    if w is not None:
        s = w.heldout.speedup
        print(f"\nwinner: {w.heldout.label}: held-out {s.median:.2f}x ({s.low:.2f}-{s.high:.2f}), "
              f"tune {w.tune.speedup:.2f}x" + (f"; best shipped preset at this floor: {result.best_shipped.label} "
                                              f"{result.best_shipped.heldout.speedup.median:.2f}x"
                                              if result.best_shipped else "; no shipped preset meets this floor"))
    else:
        print("\nwinner: none")
    if result.preset:
        print(f"saved as the preset '{result.preset}'")
    for note in result.notes:
        print(f"note: {note}")


def preset_file_name(model: str, tier: str) -> str:
    """``<model>-<tier>.json`` with the model id made a plain file name: a bundled id stays
    as it is; a hub id (owner/name) or a local folder never reaches outside the folder."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip(".-")[-100:] or "model"
    return f"{safe}-{tier}.json"


def beats_shipped(result: TuneResult) -> bool:
    """Whether the tuned winner may replace a shipped preset: it is at least as fast on the
    held-out prompts as every shipped preset that met the floor there (in the same run)."""
    best = result.best_shipped
    return best is None or result.winner.heldout.speedup.median >= best.heldout.speedup.median


def write_shipped_preset(result: TuneResult, spec: TuneSpec, tier: str, directory, command: str):
    """presets/<model>-<tier>.json from the held-out winner (the shipped fast / balanced /
    quality presets re-chosen with held-out confirmation); its description quotes the
    figures and the command."""
    from pathlib import Path

    preset = {"name": f"{spec.model} {tier}", "modality": spec.modality, "model": spec.model,
              "params": spec.request_params(), "methods": [m.to_dict() for m in result.winner.heldout.methods],
              "description": f"'{tier}' for {spec.model}: " + describe_winner(result, spec) + f" ({command})"}
    parse_preset(preset)  # a preset we write must be one the studio reads
    path = Path(directory) / preset_file_name(spec.model, tier)
    path.write_text(json.dumps(preset, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", required=True, choices=["image", "video", "audio", "text"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--floor", required=True, help="e.g. 'adherence>=-5,psnr>=28', 'exact', 'lsd<=6'")
    parser.add_argument("--trials", type=int, help="search budget in trials (default 40 without --minutes)")
    parser.add_argument("--minutes", type=float, help="search budget in minutes")
    parser.add_argument("--prompts", type=int, default=8, help="bundled prompts, split into tune and held-out")
    parser.add_argument("--prompt", action="append", help="a prompt of your own (repeat it; replaces --prompts); "
                        "prompt i runs with seed --seed + i")
    parser.add_argument("--prompt-kind", default="mixed", choices=["code", "edit", "mixed"], help="text prompts")
    parser.add_argument("--split", type=float, default=0.5, help="fraction of the prompts tuned on")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per prompt and configuration")
    parser.add_argument("--top", type=int, default=3, help="candidates confirmed on the held-out prompts")
    parser.add_argument("--methods", help="allowed methods, comma separated (default: all that apply)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--params", help="modality params as JSON (over the model's recommended settings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--study", help="study name (default: from the model, floor and settings)")
    parser.add_argument("--db", metavar="URL", help="SQLAlchemy URL of the history database that holds the study")
    parser.add_argument("--data-dir", default=os.environ.get("FASTGEN_DATA_DIR", "data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-singles", action="store_true", help="do not measure each single method held-out")
    parser.add_argument("--no-save", action="store_true", help="do not save the winner as a preset")
    parser.add_argument("--shipped-tier", choices=["fast", "balanced", "quality"],
                        help="also write the winner as the shipped preset presets/<model>-<tier>.json")
    parser.add_argument("--shipped-dir", default=str(SHIPPED_DIR), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.trials is None and args.minutes is None:
        args.trials = 40
    from benchmarks.cli import benchmark_manager
    from studio.service import Studio

    manager = benchmark_manager(args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    last = [0.0]

    def progress(done: int, total: int, stage: str) -> None:
        now = time.monotonic()
        if stage.startswith("trial") and "·" not in stage or now - last[0] > 5:  # each trial; else every 5 s
            last[0] = now
            log(f"[{done}/{total}] {stage}")

    try:
        spec = spec_from_args(args)
        studio = Studio(data_dir=args.data_dir, db_url=args.db, manager=manager, time_limit_s=None)
        try:
            result = run_tune(studio, spec, progress=progress)
        finally:
            studio.close()
    except (StudioError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print_result(result)
    command = "python -m benchmarks.tune " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.shipped_tier and result.winner is not None:
        if beats_shipped(result):
            print(f"wrote {write_shipped_preset(result, spec, args.shipped_tier, args.shipped_dir, command)}")
        else:
            print(f"kept the shipped '{args.shipped_tier}' preset: {result.best_shipped.label} was faster at this "
                  "floor on the held-out prompts")
    if args.json:
        meta = {"threads": torch.get_num_threads(), "repeats": args.repeats, "prompts": args.prompts,
                "command": command}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **result.to_dict()}, f, indent=2, default=str)
    return 0 if result.winner is not None or result.cancelled else 1


if __name__ == "__main__":
    sys.exit(main())
