"""``python -m benchmarks.report results/*.json``: Markdown tables from benchmark JSON,
so the README's tables are rendered from the committed measurements, not typed."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(data: dict) -> str:
    rows, meta = data["rows"], data["meta"]
    quality_keys = list(dict.fromkeys(k for r in rows for k in r.get("quality", {})))
    extra = [k for k in ("ideal_speedup", "efficiency", "weight_ratio", "tokens_per_target_forward", "positions_per_target_forward",
                         "decode_tokens_per_s", "real_time_factor", "total_speedup", "cold_ttft_s", "all_exact",
                         "overhead_pct")
             if any(r.get(k) is not None for r in rows)]
    spread = any("speedup_min" in r for r in rows)
    header = ["configuration", "lossless", "seconds", "speedup", *(["range"] if spread else []), *quality_keys, *extra]
    paired = "; speedup: median of paired ratios, range min-max" if spread else ""
    lines = [f"`{meta['command']}` ({meta['device']}, {meta['threads']} threads, {meta['prompts']} prompts, "
             f"median of {meta['repeats']}{paired})", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"`{r['method']}`", {True: "yes", False: "no", None: "-"}[r.get("lossless")],
                 f"{r['seconds_median']:.3f}", f"**{r['speedup']:.2f}x**"]
        if spread:
            cells.append(f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}" if "speedup_min" in r else "-")
        cells += [_fmt(r.get("quality", {}).get(k)) for k in quality_keys]
        cells += [_fmt(r.get(k)) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ideal_table(files: list[dict]) -> str:
    """One table over several result files: each caching configuration's measured speedup
    (median of paired ratios, range), its ideal speedup (what it skipped at the measured
    cost of a full vs a partial evaluation, over the whole run) and the efficiency
    measured / ideal, with the evaluation counts and costs the ideal comes from."""
    header = ["model", "configuration", "speedup", "range", "ideal", "efficiency", "partial / all evals",
              "full eval ms", "partial eval ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for data in files:
        for r in data["rows"]:
            if r.get("ideal_speedup") is None:
                continue
            costs = next((s for s in r.get("method_stats", {}).values() if "evals_partial" in s), {})
            evals = costs.get("evals_full", 0) + costs.get("evals_partial", 0)
            cells = [f"`{data['meta']['model']}`", f"`{r['method']}`", f"**{r['speedup']:.2f}x**",
                     f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}", f"{r['ideal_speedup']:.2f}x",
                     f"**{100 * r['efficiency']:.0f}%**", f"{costs.get('evals_partial', 0)} / {evals}",
                     _fmt(costs.get("full_eval_ms")), _fmt(costs.get("partial_eval_ms"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(files: list[dict]) -> str:
    """Calibrated vs uncalibrated TeaCache at matched quality: each result file holds pairs
    of configurations in order (uncalibrated, calibrated), thresholds chosen so their PSNRs
    match; one line per pair with both speedups, PSNRs, SSIMs and the denoiser evaluations
    skipped over all prompts (the baseline's minus the row's), and the R² of the model's
    fitted curve."""
    header = ["model", "curve R²", "uncalibrated", "PSNR", "SSIM", "speedup", "skipped", "calibrated", "PSNR",
              "SSIM", "speedup", "skipped", "ΔPSNR dB", "calibrated / uncalibrated"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for data in files:
        rows = [r for r in data["rows"] if r["params"]]
        base_evals = next(r["model_evals"] for r in data["rows"] if not r["params"])
        r2 = data["meta"].get("calibration", {}).get("r2")
        for plain, fitted in zip(rows[::2], rows[1::2]):
            cells = [f"`{data['meta']['model']}`", _fmt(r2)]
            for r in (plain, fitted):
                cells += [f"`{r['method']}`", f"{r['quality']['psnr']:.2f}", f"{r['quality']['ssim']:.3f}",
                          f"**{r['speedup']:.2f}x** ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
                          f"{base_evals - r['model_evals']} / {base_evals}"]
            cells += [f"{fitted['quality']['psnr'] - plain['quality']['psnr']:+.2f}",
                      f"**{fitted['speedup'] / plain['speedup']:.2f}**"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def main(argv=None) -> int:
    names = list(argv if argv is not None else sys.argv[1:])
    if names[:1] == ["--calibration"]:  # calibrated vs uncalibrated TeaCache at matched PSNR
        print(calibration_table([json.loads(Path(name).read_text()) for name in names[1:]]))
        return 0
    if names[:1] == ["--ideal"]:  # the caching methods' measured vs ideal speedup, one table
        print(ideal_table([json.loads(Path(name).read_text()) for name in names[1:]]))
        return 0
    for name in names:
        print(f"#### {Path(name).stem}\n")
        print(table(json.loads(Path(name).read_text())))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
