"""Figures for a comparison: speed vs quality (Pareto front marked), time per stage, and the
evidence views (timeline, |difference|, XYZ grid, seed drift)."""

from __future__ import annotations

import matplotlib
import numpy as np

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


# -- evidence views (studio/evidence.py holds the data; these only draw it) ----------------
def figure_image(fig):
    """A matplotlib figure as a PIL image (closed afterwards): the evidence views are shown
    as images, so they can be saved and compared like any output."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _kind_colormap():
    from matplotlib.colors import ListedColormap

    return ListedColormap(["#d9d9d9", "#f4a259", "#2a6f97"])  # reused, partial, computed


def timeline_figure(rows, title: str = "what each configuration computed, per denoising step"):
    """Rows = configurations (per CFG branch), columns = steps; colour = computed /
    partial / reused. None when no row has a timeline (text, audio codec LMs...)."""
    from matplotlib.patches import Patch

    from studio.evidence import timeline_matrix

    labels, matrix = timeline_matrix(rows)
    if not labels or matrix.shape[1] == 0:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, min(12.0, 3 + 0.22 * matrix.shape[1])), 0.9 + 0.32 * len(labels)), dpi=100)
    ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=_kind_colormap(), vmin=0, vmax=2,
              interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("denoising step")
    ax.set_xticks(range(0, matrix.shape[1], max(1, -(-matrix.shape[1] // 12))))
    ax.set_title(title, fontsize=9)
    colors = _kind_colormap().colors
    ax.legend(handles=[Patch(color=colors[2], label="computed"), Patch(color=colors[1], label="partial"),
                       Patch(color=colors[0], label="reused")], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def block_timeline_figure(blocks: list[str], label: str):
    """One configuration per block (or attention layer): rows = blocks, columns = steps."""
    grid = np.array([[int(c) * 2 for c in step] for step in blocks], dtype=float).T
    fig, ax = plt.subplots(figsize=(max(6.0, min(12.0, 3 + 0.22 * grid.shape[1])), 1.0 + 0.22 * grid.shape[0]), dpi=100)
    ax.imshow(grid, aspect="auto", cmap=_kind_colormap(), vmin=0, vmax=2, interpolation="nearest")
    ax.set_ylabel("block / attention layer")
    ax.set_xlabel("denoising step")
    ax.set_title(f"{label}: per block (blue computed, grey reused)", fontsize=9)
    fig.tight_layout()
    return fig


def draft_length_figure(rows):
    """Text: tokens kept per model forward, one line per configuration that has them: the
    drafts a verification forward accepted, or the tokens a diffusion LM's denoising step
    committed."""
    from studio.evidence import draft_lengths

    series = [(row.label, draft_lengths(row)) for row in rows]
    series = [(label, steps) for label, steps in series if steps]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 2.8), dpi=100)
    for label, steps in series:
        ax.step(range(len(steps)), steps, where="mid", label=label, lw=1)
    ax.set_xlabel("forward (verification or denoising step)")
    ax.set_ylabel("tokens kept / committed")
    ax.set_title("tokens kept per model forward", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def difference_figure(diff, label: str):
    """|difference| vs the baseline as a heatmap with its colour scale. The scale tops out
    at the largest difference (at least 1 of 255), so small differences are amplified to
    full colour; the colour bar reads in pixel values."""
    top = max(1.0, float(diff.max()))
    fig, ax = plt.subplots(figsize=(4.6, 4), dpi=100)
    shown = ax.imshow(diff, cmap="inferno", vmin=0, vmax=top, interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046)
    bar.set_label(f"|difference| (0-255; scale amplified x{255 / top:.0f})", fontsize=8)
    ax.set_axis_off()
    ax.set_title(f"vs baseline: mean {diff.mean():.2f}, max {diff.max():.0f}", fontsize=8)
    fig.tight_layout()
    return fig


def grid_figure(pictures, captions, x_name: str, x_values, y_name: str, y_values):
    """The XYZ grid: ``pictures[y][x]`` (PIL images or None) with ``captions[y][x]`` (speed
    and quality) under each; the axes name the two parameters."""
    ny, nx = len(y_values), len(x_values)
    fig, axes = plt.subplots(ny, nx, figsize=(1.2 + 2.2 * nx, 0.6 + 2.4 * ny), dpi=100, squeeze=False)
    for yi, xi in ((a, b) for a in range(ny) for b in range(nx)):
        ax = axes[yi][xi]
        picture = pictures[yi][xi]
        if picture is not None:
            ax.imshow(picture, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(captions[yi][xi], fontsize=7)
        if yi == 0:
            ax.set_title(f"{x_name}={x_values[xi]}", fontsize=8)
        if xi == 0:
            ax.set_ylabel(f"{y_name}={y_values[yi]}", fontsize=8)
    fig.tight_layout()
    return fig


def seed_drift_figure(entries, metric: str, label: str):
    """Per seed: quality (left) and speedup (right), each seed a point over a box."""
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.6), dpi=100)
    for ax, key in zip(axes, (metric, "speedup")):
        values = [e[key] for e in entries if e.get(key) is not None and np.isfinite(e[key])]
        if values:
            ax.boxplot(values, vert=False, widths=0.5)
            ax.scatter(values, [1] * len(values), c="tab:red", zorder=3, s=18)
            for e in entries:
                if e.get(key) is not None and np.isfinite(e[key]):
                    ax.annotate(str(e["seed"]), (e[key], 1), fontsize=7, xytext=(0, 6), textcoords="offset points")
        ax.set_yticks([])
        ax.set_xlabel(key)
    fig.suptitle(f"{label}: spread over seeds", fontsize=9)
    fig.tight_layout()
    return fig


def calibration_curve_figure(xs: list[float], ys: list[float], grid: list[float], fitted: list[float]):
    """TeaCache calibration: the measured (input change, output change) pairs per step and
    the fitted rescale polynomial."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter(xs, ys, s=12, alpha=0.6, label="measured steps")
    if grid:
        ax.plot(grid, fitted, c="tab:red", lw=1.5, label="fitted polynomial (degree 4)")
    ax.set_xlabel("relative L1 change of the modulated input")
    ax.set_ylabel("relative L1 change of the block-stack residual")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("TeaCache rescale curve")
    fig.tight_layout()
    return fig


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
