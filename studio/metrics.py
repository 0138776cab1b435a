"""Quality against the baseline output of the same request (same seed).

Image/video: PSNR and SSIM. Text: exact match and token agreement. Audio: log-spectral
distance and SNR. Task scores for bundled models (prompt adherence of shape images)
come from the small classifier shipped beside them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_float_array(image: Any) -> np.ndarray:
    """PIL image or array -> float64 array in [0, 1], HxWxC."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if array.max(initial=0) > 1.0:
        array = array / 255.0
    return array if array.ndim == 3 else array[..., None]


PSNR_IDENTICAL = 100.0  # dB reported for identical outputs (keeps every figure finite JSON)


def psnr(reference: Any, test: Any) -> float:
    a, b = to_float_array(reference), to_float_array(test)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(1.0 / mse))


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    from scipy.ndimage import convolve1d

    out = convolve1d(image, window, axis=0, mode="reflect")
    return convolve1d(out, window, axis=1, mode="reflect")


def ssim(reference: Any, test: Any) -> float:
    """Mean SSIM (Wang et al. 2004) over channels, Gaussian window 7, sigma 1.5."""
    a, b = to_float_array(reference), to_float_array(test)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window(min(7, a.shape[0] | 1, a.shape[1] | 1))
    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = _filter(x, window), _filter(y, window)
        sxx = _filter(x * x, window) - mx * mx
        syy = _filter(y * y, window) - my * my
        sxy = _filter(x * y, window) - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx * mx + my * my + c1) * (sxx + syy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


def video_quality(reference: list, test: list) -> dict[str, float]:
    n = min(len(reference), len(test))
    if n == 0:
        return {}
    return {
        "psnr": float(np.mean([psnr(reference[i], test[i]) for i in range(n)])),
        "ssim": float(np.mean([ssim(reference[i], test[i]) for i in range(n)])),
    }


def text_agreement(reference: str, test: str, tokenize=None) -> dict[str, float]:
    """Exact match and the fraction of leading tokens that agree (the first divergence
    is what matters for greedy decoding; everything after it is conditioned on it)."""
    tokenize = tokenize or (lambda s: s.split())
    ref, out = tokenize(reference), tokenize(test)
    common = 0
    for x, y in zip(ref, out):
        if x != y:
            break
        common += 1
    return {
        "exact_match": float(reference == test),
        "token_agreement": common / max(len(ref), len(out), 1),
    }


def _log_spectrum(waveform: np.ndarray, n_fft: int = 512) -> np.ndarray:
    waveform = np.asarray(waveform, dtype=np.float64).reshape(-1)
    hop = n_fft // 4
    if len(waveform) < n_fft:
        waveform = np.pad(waveform, (0, n_fft - len(waveform)))
    frames = np.lib.stride_tricks.sliding_window_view(waveform, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    return np.log10(power + 1e-10)


def audio_quality(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Log-spectral distance (dB) and SNR (dB) of ``test`` against ``reference``."""
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    out = np.asarray(test, dtype=np.float64).reshape(-1)
    n = min(len(ref), len(out))
    ref, out = ref[:n], out[:n]
    a, b = _log_spectrum(ref), _log_spectrum(out)
    lsd = float(np.mean(np.sqrt(np.mean((10 * (a - b)) ** 2, axis=-1))))
    noise = float(np.sum((ref - out) ** 2))
    snr = PSNR_IDENTICAL if noise == 0 else min(PSNR_IDENTICAL, 10 * math.log10(max(float(np.sum(ref**2)), 1e-20) / noise))
    return {"lsd": lsd, "snr": snr}


def quality(modality: str, reference: Any, test: Any) -> dict[str, float]:
    """The quality figures of ``test`` against the baseline ``reference``."""
    if modality == "image":
        return {"psnr": psnr(reference, test), "ssim": ssim(reference, test)}
    if modality == "video":
        return video_quality(reference, test)
    if modality == "text":
        return text_agreement(reference, test)
    if modality == "audio":
        return audio_quality(reference[0], test[0])
    raise ValueError(modality)


def _grade_shapes(outputs: list, prompts: list[str]) -> dict[str, float] | None:
    from backends.tiny.shapes import score_images

    try:
        return score_images(outputs, prompts)
    except (FileNotFoundError, OSError):  # the classifier's folder is missing from assets/
        return None


def _grade_moving_shapes(outputs: list, prompts: list[str]) -> dict[str, float]:
    from backends.tiny.video_models import score_clips

    return score_clips(outputs, prompts)


def _grade_synth_sounds(outputs: list, prompts: list[str]) -> dict[str, float]:
    from backends.tiny.audio_data import score_audio

    return score_audio(outputs, 16000, prompts)  # outputs are (waveform, rate) pairs: their own rate counts


# The graders a bundled model can name in its catalog entry (``BundledModel.grader``).
TASK_GRADERS = {"shapes": _grade_shapes, "moving-shapes": _grade_moving_shapes, "synth-sounds": _grade_synth_sounds}


def task_score(modality: str, model: str, outputs: list, prompts: list[str]) -> dict[str, float] | None:
    """Prompt adherence for a bundled model whose catalog entry names a grader; None otherwise."""
    from backends.catalog import find_bundled

    entry = find_bundled(model)
    if entry is None or entry.grader is None or entry.modality != modality:
        return None
    return TASK_GRADERS[entry.grader](outputs, prompts)
