"""Figures for a comparison: speed vs quality (Pareto front marked), time per stage."""

from __future__ import annotations

import difflib
import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from studio.compare import CompareReport, quality_label, quality_score  # noqa: E402


def speed_quality_figure(report: CompareReport):
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    front = set(report.pareto())
    for row in report.rows:
        if row.speedup is None:
            continue
        q = quality_score(report.modality, row)
        on_front = row.label in front
        ax.scatter(row.speedup, q, s=60, c="tab:red" if on_front else "tab:blue", zorder=3)
        ax.annotate(row.label, (row.speedup, q), fontsize=7, xytext=(4, 4), textcoords="offset points")
    pts = sorted((r.speedup, quality_score(report.modality, r)) for r in report.rows if r.label in front and r.speedup)
    if len(pts) > 1:
        ax.plot(*zip(*pts), "--", c="tab:red", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("speedup vs baseline (x)")
    ax.set_ylabel(quality_label(report.modality))
    ax.grid(alpha=0.3)
    ax.set_title("speed vs quality")
    fig.tight_layout()
    return fig


def stages_figure(report: CompareReport):
    rows = [r for r in report.rows if r.stages]
    stages = [s for s in ("encode", "prefill", "denoise", "decode") if any(s in r.stages for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * max(1, len(rows))), dpi=100)
    left = [0.0] * len(rows)
    for stage in stages:
        widths = [r.stages.get(stage, 0.0) for r in rows]
        ax.barh([r.label for r in rows], widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds (median)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("time per stage")
    fig.tight_layout()
    return fig


def text_diff_html(baseline: str, other: str) -> str:
    """Words that differ from the baseline, highlighted (insertions green, deletions red)."""
    a, b = baseline.split(" "), other.split(" ")
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape(" ".join(a[i1:i2])))
        if op in ("delete", "replace"):
            out.append(f"<del style='background:#fdd'>{html.escape(' '.join(a[i1:i2]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins style='background:#dfd'>{html.escape(' '.join(b[j1:j2]))}</ins>")
    return "<pre style='white-space:pre-wrap'>" + " ".join(out) + "</pre>"


def audio_figure(waveform, sample_rate: int):
    """Waveform above a log spectrogram: how to 'listen' to a clip on a screen."""
    import numpy as np

    data = np.asarray(waveform, dtype=np.float32).reshape(-1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 3.6), dpi=100, sharex=True)
    times = np.arange(len(data)) / sample_rate
    top.plot(times, data, lw=0.5)
    top.set_ylabel("amplitude")
    top.set_title("waveform and spectrogram")
    bottom.specgram(data + 1e-9, Fs=sample_rate, NFFT=512, noverlap=384, cmap="magma")
    bottom.set_ylabel("Hz")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    return fig


def frame_strip(frames, max_frames: int = 8):
    """Frames side by side (a video at a glance)."""
    from PIL import Image

    step = max(1, len(frames) // max_frames)
    chosen = [f.convert("RGB") for f in frames[::step][:max_frames]]
    w, h = chosen[0].size
    strip = Image.new("RGB", (w * len(chosen), h))
    for i, frame in enumerate(chosen):
        strip.paste(frame, (i * w, 0))
    return strip


def tune_pareto_figure(result):
    """An auto-tune's trials: speedup vs the quality axis on the tune prompts, the Pareto
    front joined, trials below the floor hollow, the held-out winner starred."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    key, sign = result.primary, (-1.0 if result.primary == "lsd" else 1.0)
    points = [(t.speedup, sign * t.quality[key], t.feasible) for t in result.trials
              if t.speedup is not None and key in t.quality]
    for speed, quality, feasible in points:
        ax.scatter(speed, quality, s=40, zorder=3, facecolors="tab:blue" if feasible else "none",
                   edgecolors="tab:blue")
    front = sorted((t.speedup, sign * t.quality[key]) for t in result.pareto)
    if front:
        ax.plot(*zip(*front), "--o", c="tab:red", lw=1, ms=5, label="Pareto front (tune prompts)", zorder=4)
    if result.winner is not None and result.winner.tune is not None and key in result.winner.tune.quality:
        ax.scatter(result.winner.tune.speedup, sign * result.winner.tune.quality[key], marker="*", s=220,
                   c="gold", edgecolors="black", zorder=5, label=f"winner: {result.winner.heldout.label}"[:60])
    if front or result.winner is not None:
        ax.legend(fontsize=7)
    ax.set_xlabel("speedup vs baseline (x)")
    ax.set_ylabel(("-" if sign < 0 else "") + key + " vs baseline")
    ax.grid(alpha=0.3)
    ax.set_title(f"auto-tune: {len(points)} trials (hollow: below the floor)")
    fig.tight_layout()
    return fig
