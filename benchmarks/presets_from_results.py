"""``python -m benchmarks.presets_from_results benchmarks/results/*.json``

Writes presets/<model>-fast|balanced|quality.json from measured benchmark rows: each
tier is the fastest configuration whose quality against the baseline clears the tier's
bar, and its description quotes the measured numbers it was chosen on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from studio.presets import SHIPPED_DIR, parse_preset

# (min PSNR dB for images / video, min token agreement for text, max log-spectral
# distance dB for audio, max adherence drop in points)
TIERS = {
    "quality": {"psnr": 30.0, "token_agreement": 1.0, "lsd": 4.0, "task_drop": 2.0},
    "balanced": {"psnr": 22.0, "token_agreement": 1.0, "lsd": 9.0, "task_drop": 5.0},
    "fast": {"psnr": 16.0, "token_agreement": 0.9, "lsd": 16.0, "task_drop": 10.0},
}


def passes(row: dict, base: dict, tier: dict) -> bool:
    quality = row.get("quality", {})
    if "psnr" in quality and quality["psnr"] < tier["psnr"]:
        return False
    if "token_agreement" in quality and quality["token_agreement"] < tier["token_agreement"]:
        return False
    if "lsd" in quality and quality["lsd"] > tier["lsd"]:
        return False
    base_task, task = base.get("quality", {}).get("task_all"), quality.get("task_all")
    if base_task is not None and task is not None and 100 * (base_task - task) > tier["task_drop"]:
        return False
    return True


def describe(row: dict, base: dict, tier_name: str, meta: dict) -> str:
    q = row.get("quality", {})
    parts = [f"{row['speedup']:.2f}x vs baseline"]
    if "psnr" in q:
        parts.append(f"PSNR {q['psnr']:.1f} dB, SSIM {q.get('ssim', 0):.3f}")
    if "token_agreement" in q:
        parts.append(f"token agreement {q['token_agreement']:.2f}")
    if "lsd" in q:
        parts.append(f"log-spectral distance {q['lsd']:.1f} dB")
    if "task_all" in q:
        parts.append(f"prompt adherence {100 * q['task_all']:.0f}% (baseline {100 * base['quality']['task_all']:.0f}%)")
    return (f"'{tier_name}' for {meta['model']}, chosen from measured results: " + ", ".join(parts)
            + f" ({meta['device']}, {meta['threads']} threads; {meta['command']}).")


def presets_for(data: dict) -> list[dict]:
    meta, rows = data["meta"], data["rows"]
    base = next(r for r in rows if r["method"] == "baseline")
    out = []
    for tier_name, tier in TIERS.items():
        candidates = [r for r in rows if r["method"] != "baseline" and passes(r, base, tier) and r["speedup"] > 1.0]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["speedup"])
        params = {k: v for k, v in meta["params"].items() if isinstance(v, (int, float, str, bool))}
        out.append({"name": f"{meta['model']} {tier_name}", "modality": meta["modality"], "model": meta["model"],
                    "params": params, "methods": best["params"], "description": describe(best, base, tier_name, meta)})
    return out


def main(argv=None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        data = json.loads(Path(name).read_text())
        if data["rows"][0]["method"] == "studio-overhead":
            continue
        for preset in presets_for(data):
            parse_preset(preset)  # a preset we write must be one the studio reads
            tier = preset["name"].rsplit(" ", 1)[1]
            path = SHIPPED_DIR / f"{preset['model']}-{tier}.json"
            path.write_text(json.dumps(preset, indent=2) + "\n", encoding="utf-8")
            print(f"{path}: {preset['description']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
