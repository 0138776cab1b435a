"""``python -m benchmarks.report results/*.json``: Markdown tables from benchmark JSON,
so the README's tables are rendered from the committed measurements, not typed."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(data: dict) -> str:
    rows, meta = data["rows"], data["meta"]
    quality_keys = list(dict.fromkeys(k for r in rows for k in r.get("quality", {})))
    extra = [k for k in ("ideal_speedup", "efficiency", "tokens_per_target_forward", "positions_per_target_forward",
                         "decode_tokens_per_s", "real_time_factor", "all_exact", "overhead_pct")
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


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def main(argv=None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        print(f"#### {Path(name).stem}\n")
        print(table(json.loads(Path(name).read_text())))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
