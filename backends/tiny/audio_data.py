"""The synthetic "sounds" world of the bundled audio model, its spectrogram and its checker.

One ~1 s clip at 16 kHz, described by a short prompt from a closed grammar:

    tone      "a high sine tone"                               pitch x timbre
    chord     "a low minor chord on a saw wave"                pitch x quality x timbre
    arpeggio  "a mid major arpeggio going up on a square wave" pitch x quality x direction x timbre
    drums     "a fast drum pattern"                            tempo
    noise     "a pink noise texture"                           colour

Pitches are the roots C4 / C5 / C6 (low / mid / high); timbres are band-limited
sine / square / saw; arpeggios play root-third-fifth-octave in quarters of the clip.

The model sees a 64-band log-mel spectrogram of 64 frames (``audio_to_spec``), scaled to
about [-1, 1]; ``spec_to_audio`` inverts it: mel pseudo-inverse, then fast Griffin-Lim
(Perraudin et al. 2013) with ``torch.stft`` / ``torch.istft``, deterministic (zero initial
phase) so a seed still means one waveform.

A small CNN with one head per attribute grades any waveform against its prompt:
``score_audio(waveforms, sample_rate, prompts)``. Train it with
``python -m backends.tiny.train synth-audio-classifier`` (~3 min on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backends.tiny.shapes import AttributeCNN

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CLASSIFIER_DIR = ASSETS / "audio-classifier"

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 256
N_MELS = 64
N_FRAMES = 64
N_SAMPLES = HOP * (N_FRAMES - 1)  # 16128 samples (1.008 s): centred STFT gives exactly 64 frames
LOG_FLOOR = 1e-3  # magnitude floor of the log-mel (about -60 dB below a loud tone)
LOG_CENTER, LOG_SCALE = -1.0, 6.0  # log-mel -> (x - center) / scale, roughly [-1, 1]

KINDS = ("tone", "chord", "arpeggio", "drums", "noise")
PITCHES = {"low": 261.63, "mid": 523.25, "high": 1046.50}  # C4, C5, C6
TIMBRES = ("sine", "square", "saw")
QUALITIES = {"major": (0, 4, 7, 12), "minor": (0, 3, 7, 12)}
DIRECTIONS = ("up", "down")
TEMPOS = {"slow": 4, "fast": 8}  # hits per clip
COLOURS = ("white", "pink")
ATTRIBUTES = ("kind", "pitch", "timbre", "quality", "direction", "tempo", "colour")
VOCAB = {
    "kind": KINDS, "pitch": tuple(PITCHES), "timbre": TIMBRES, "quality": tuple(QUALITIES),
    "direction": DIRECTIONS, "tempo": tuple(TEMPOS), "colour": COLOURS,
}
# which attributes a kind of sound has (the others are None in its spec)
KIND_ATTRIBUTES = {
    "tone": ("pitch", "timbre"),
    "chord": ("pitch", "quality", "timbre"),
    "arpeggio": ("pitch", "quality", "direction", "timbre"),
    "drums": ("tempo",),
    "noise": ("colour",),
}


@dataclass(frozen=True)
class SoundSpec:
    kind: str
    pitch: str | None = None
    timbre: str | None = None
    quality: str | None = None
    direction: str | None = None
    tempo: str | None = None
    colour: str | None = None

    def attributes(self) -> dict[str, str]:
        return {"kind": self.kind, **{a: getattr(self, a) for a in KIND_ATTRIBUTES[self.kind]}}


def all_specs() -> list[SoundSpec]:
    specs = [SoundSpec("tone", pitch=p, timbre=t) for p in PITCHES for t in TIMBRES]
    specs += [SoundSpec("chord", pitch=p, quality=q, timbre=t) for p in PITCHES for q in QUALITIES for t in TIMBRES]
    specs += [SoundSpec("arpeggio", pitch=p, quality=q, direction=d, timbre=t)
              for p in PITCHES for q in QUALITIES for d in DIRECTIONS for t in TIMBRES]
    specs += [SoundSpec("drums", tempo=t) for t in TEMPOS]
    specs += [SoundSpec("noise", colour=c) for c in COLOURS]
    return specs


def random_spec(rng: random.Random) -> SoundSpec:
    """A kind uniformly (so drums and noise are not rare), then its attributes uniformly."""
    kind = rng.choice(KINDS)
    return SoundSpec(kind, **{a: rng.choice(VOCAB[a]) for a in KIND_ATTRIBUTES[kind]})


def prompt_for(spec: SoundSpec) -> str:
    if spec.kind == "tone":
        return f"a {spec.pitch} {spec.timbre} tone"
    if spec.kind == "chord":
        return f"a {spec.pitch} {spec.quality} chord on a {spec.timbre} wave"
    if spec.kind == "arpeggio":
        return f"a {spec.pitch} {spec.quality} arpeggio going {spec.direction} on a {spec.timbre} wave"
    if spec.kind == "drums":
        return f"a {spec.tempo} drum pattern"
    return f"a {spec.colour} noise texture"


_KIND_WORDS = {"tone": "tone", "chord": "chord", "arpeggio": "arpeggio", "drums": "drum", "noise": "noise"}


def parse_prompt(prompt: str) -> SoundSpec | None:
    """Find the kind and its attributes anywhere in ``prompt``; None unless all are named once."""
    text = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    kinds = [k for k, w in _KIND_WORDS.items() if f" {w} " in text or f" {w}s " in text]
    if len(kinds) != 1:
        return None
    found = {}
    for attr in KIND_ATTRIBUTES[kinds[0]]:
        hits = [w for w in VOCAB[attr] if f" {w} " in text]
        if len(hits) != 1:
            return None
        found[attr] = hits[0]
    return SoundSpec(kinds[0], **found)


def prompt_words() -> list[str]:
    """Every word of the closed prompt grammar (the tokenizer spells each as one token)."""
    words = set()
    for spec in all_specs():
        words.update(prompt_for(spec).split())
    return sorted(words)


def audio_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of the grammar, reproducible from ``seed`` (benchmarks, evaluation)."""
    rng = random.Random(seed)
    return [prompt_for(random_spec(rng)) for _ in range(n)]


# ----------------------------------------------------------------------------- synthesiser


def _oscillator(freq: np.ndarray | float, timbre: str, n: int, phase0: float) -> np.ndarray:
    """Band-limited sine / square (odd harmonics, 1/k) / saw (all harmonics, 1/k) at ``freq`` (Hz, may vary)."""
    freq = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    phase = phase0 + 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    if timbre == "sine":
        return np.sin(phase)
    ks = range(1, int(SAMPLE_RATE / 2 / freq.max()) + 1)
    ks = [k for k in ks if k % 2 == 1] if timbre == "square" else list(ks)
    out = sum(np.sin(k * phase) / k for k in ks)
    return out * (0.8 if timbre == "square" else 0.6)  # similar loudness to the sine


def _envelope(n: int, attack: int = 160, release: int = 800) -> np.ndarray:
    env = np.ones(n)
    env[:attack] = np.linspace(0, 1, attack)
    env[-release:] = np.minimum(env[-release:], np.linspace(1, 0, release))
    return env


def _note_freqs(spec: SoundSpec, detune: float) -> list[float]:
    root = PITCHES[spec.pitch] * 2 ** (detune / 12)
    return [root * 2 ** (s / 12) for s in QUALITIES[spec.quality or "major"]]


def synthesize(spec: SoundSpec, rng: random.Random | None = None) -> np.ndarray:
    """One clip of ``N_SAMPLES`` float32 samples in [-1, 1]; ``rng`` adds small variation
    (detune within +-0.3 semitone, gain, phase, drum timing), keeping every attribute intact."""
    rng = rng or random.Random(0)
    n = N_SAMPLES
    detune = rng.uniform(-0.3, 0.3)
    gain = rng.uniform(0.35, 0.6)
    nrng = np.random.default_rng(rng.randrange(2**31))
    if spec.kind == "tone":
        x = _oscillator(PITCHES[spec.pitch] * 2 ** (detune / 12), spec.timbre, n, rng.uniform(0, 6.28)) * _envelope(n)
    elif spec.kind == "chord":
        x = sum(_oscillator(f, spec.timbre, n, rng.uniform(0, 6.28)) for f in _note_freqs(spec, detune)[:3]) / 2.2
        x = x * _envelope(n)
    elif spec.kind == "arpeggio":
        freqs = _note_freqs(spec, detune)
        if spec.direction == "down":
            freqs = freqs[::-1]
        seg = n // 4
        x = np.zeros(n)
        for i, f in enumerate(freqs):
            m = n - 3 * seg if i == 3 else seg
            x[i * seg : i * seg + m] = _oscillator(f, spec.timbre, m, rng.uniform(0, 6.28)) * _envelope(m, 80, 400)
    elif spec.kind == "drums":
        hits = TEMPOS[spec.tempo]
        period = n / hits * rng.uniform(0.95, 1.0)
        start = rng.uniform(0, 0.15) * period
        x = np.zeros(n)
        for h in range(hits):
            at = int(start + h * period)
            if at >= n:
                break
            m = min(n - at, 4000)
            t = np.arange(m) / SAMPLE_RATE
            if h % 2 == 0:  # kick: a sine falling from 160 to 50 Hz, fast decay
                f = 50 + 110 * np.exp(-t * 30)
                hit = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * np.exp(-t * 18)
            else:  # snare: noise burst plus a 200 Hz body
                hit = (0.6 * nrng.standard_normal(m) + 0.5 * np.sin(2 * np.pi * 200 * t)) * np.exp(-t * 30)
            x[at : at + m] += hit
        x = x / max(1e-6, np.abs(x).max()) * 0.9
    else:  # noise
        white = nrng.standard_normal(n)
        if spec.colour == "pink":  # 1/f power: scale the spectrum by 1/sqrt(f)
            spec_f = np.fft.rfft(white)
            f = np.arange(len(spec_f))
            f[0] = 1
            white = np.fft.irfft(spec_f / np.sqrt(f), n)
        x = white / (white.std() + 1e-9) * 0.3 * _envelope(n, 400, 800)
    return np.clip(x * gain, -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------- spectrogram


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """HTK triangular filters, peak 1, shape (n_mels, n_fft // 2 + 1)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = edges[i : i + 3]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[i] = np.maximum(0, np.minimum(up, down))
    return torch.tensor(fb, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _mel_pinv(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    return torch.linalg.pinv(mel_filterbank(n_mels, n_fft, sample_rate))


@functools.lru_cache(maxsize=4)
def _window(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft)


def audio_to_spec(waveforms: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Waveforms [batch, samples] (16 kHz) -> scaled log-mel [batch, 1, N_MELS, N_FRAMES],
    low frequencies at row 0. Longer clips are cut, shorter ones zero-padded."""
    x = torch.as_tensor(np.asarray(waveforms, dtype=np.float32) if not torch.is_tensor(waveforms) else waveforms)
    x = x.float().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.float()[None]
    x = F.pad(x, (0, max(0, N_SAMPLES - x.shape[-1])))[:, :N_SAMPLES]
    mag = torch.stft(x, N_FFT, HOP, window=_window(N_FFT), center=True, return_complex=True).abs()
    mel = torch.einsum("mf,bft->bmt", mel_filterbank(), mag)
    return ((torch.log(mel.clamp_min(LOG_FLOOR)) - LOG_CENTER) / LOG_SCALE)[:, None]


def spec_to_magnitude(spec: torch.Tensor, nnls_iters: int = 30) -> torch.Tensor:
    """Scaled log-mel [batch, 1, mels, frames] -> linear STFT magnitude [batch, freqs, frames].

    The mel pseudo-inverse (clamped at 0) smears a partial over neighbouring bins and pulls
    its peak towards the band centre; a few multiplicative non-negative least-squares
    updates (Lee & Seung) sharpen it again (a low C: 3.4% flat -> 0.8%).
    """
    fb = mel_filterbank()
    mel = torch.exp(spec[:, 0].float() * LOG_SCALE + LOG_CENTER)
    mel = torch.where(mel <= LOG_FLOOR * 1.0001, torch.zeros_like(mel), mel)  # the floor was silence
    lin = torch.einsum("fm,bmt->bft", _mel_pinv(N_MELS, N_FFT, SAMPLE_RATE), mel).clamp_min(0.0) + 1e-6
    target = torch.einsum("mf,bmt->bft", fb, mel)
    for _ in range(nnls_iters):
        lin = lin * target / (torch.einsum("mf,bmt->bft", fb, torch.einsum("mf,bft->bmt", fb, lin)) + 1e-8)
    return lin


def griffin_lim(magnitude: torch.Tensor, iters: int = 32, momentum: float = 0.99, length: int = N_SAMPLES) -> torch.Tensor:
    """Fast Griffin-Lim (Perraudin et al. 2013) from zero phase: [batch, freqs, frames] -> [batch, samples]."""
    window = _window(N_FFT)
    angles = torch.ones_like(magnitude, dtype=torch.complex64)
    prev = torch.zeros_like(angles)
    for _ in range(iters):
        wave = torch.istft(magnitude * angles, N_FFT, HOP, window=window, center=True, length=length)
        rebuilt = torch.stft(wave, N_FFT, HOP, window=window, center=True, return_complex=True)
        accel = rebuilt - (momentum / (1 + momentum)) * prev
        angles = accel / accel.abs().clamp_min(1e-8)
        prev = rebuilt
    return torch.istft(magnitude * angles, N_FFT, HOP, window=window, center=True, length=length)


def spec_to_audio(spec: torch.Tensor, iters: int = 32) -> torch.Tensor:
    """The vocoder: scaled log-mel [batch, 1, mels, frames] -> waveforms [batch, samples] in [-1, 1]."""
    wave = griffin_lim(spec_to_magnitude(spec), iters=iters)
    return wave.clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- classifier


@dataclass
class ClassifierConfig:
    width: int = 32
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    minutes: float = 4.0
    vocoded_fraction: float = 0.25  # share of each batch round-tripped through Griffin-Lim
    seed: int = 0


class AudioClassifier(AttributeCNN):
    """One head per sound attribute on the 64x64 log-mel (pitch lives in *where* the energy is)."""

    def __init__(self, width: int = 32):
        super().__init__(1, {a: len(VOCAB[a]) for a in ATTRIBUTES}, width)


def _labels(spec: SoundSpec) -> list[int]:
    """Class index per attribute, -100 (ignored by cross-entropy) where it does not apply."""
    attrs = spec.attributes()
    return [VOCAB[a].index(attrs[a]) if a in attrs else -100 for a in ATTRIBUTES]


def synth_batch(specs: list[SoundSpec], rng: random.Random) -> torch.Tensor:
    return torch.from_numpy(np.stack([synthesize(s, rng) for s in specs]))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Spectrogram noise, blur along time and level drift, so generated clips are graded fairly."""
    b = x.shape[0]
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.15
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        x[blur] = F.avg_pool2d(x[blur], (1, 3), stride=1, padding=(0, 1), count_include_pad=False)
    return x + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)


def train_audio_classifier_main(argv: list[str] | None = None) -> int:
    cfg = ClassifierConfig()
    p = argparse.ArgumentParser(prog="synth-audio-classifier", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--steps", type=int, default=cfg.steps)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    args = p.parse_args(argv)
    cfg.minutes, cfg.steps = args.minutes, args.steps
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    model = AudioClassifier(cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    t0, step, est_total = time.time(), 0, cfg.steps
    while step < cfg.steps and time.time() - t0 < cfg.minutes * 60:
        if step == 10:  # how many steps fit the time budget, so the cosine decay ends on time
            est_total = min(cfg.steps, int(cfg.minutes * 60 / ((time.time() - t0) / 10)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / est_total)))
        specs = [random_spec(rng) for _ in range(cfg.batch_size)]
        with torch.no_grad():
            x = audio_to_spec(synth_batch(specs, rng))
            k = int(cfg.batch_size * cfg.vocoded_fraction)
            if k:
                x[:k] = audio_to_spec(spec_to_audio(x[:k], iters=16))
            x = _augment(x, gen)
        y = torch.tensor([_labels(s) for s in specs])
        out = model(x)
        loss = sum(F.cross_entropy(out[a], y[:, i], ignore_index=-100) for i, a in enumerate(ATTRIBUTES)
                   if (y[:, i] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        step += 1
    model.eval()
    save_classifier(model, args.out, {"width": cfg.width, "steps": step, "train": asdict(cfg)})
    _load_cached.cache_clear()
    rng_eval = random.Random(123)
    specs = [random_spec(rng_eval) for _ in range(256)]
    waves = np.stack([synthesize(s, rng_eval) for s in specs])
    clean = score_audio(waves, SAMPLE_RATE, [prompt_for(s) for s in specs], args.out)
    vocoded = score_audio(spec_to_audio(audio_to_spec(waves)).numpy(), SAMPLE_RATE, [prompt_for(s) for s in specs],
                          args.out)
    report = {"steps": step, "seconds": round(time.time() - t0), "clean": clean, "vocoded": vocoded}
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return 0


def save_classifier(model: AudioClassifier, out: Path, config: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    meta = {**config, "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS,
            "n_frames": N_FRAMES, "attributes": {a: list(VOCAB[a]) for a in ATTRIBUTES}}
    (out / "config.json").write_text(json.dumps(meta, indent=2))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> AudioClassifier:
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    model = AudioClassifier(cfg["width"])
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval()


def _resample(wave: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), SAMPLE_RATE)
    return resample_poly(wave, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


@torch.no_grad()
def score_audio(waveforms, sample_rate: int, prompts: list[str], path: str | Path | None = None) -> dict:
    """Fraction of clips whose predicted attributes match their prompt.

    ``waveforms``: a list of 1-D arrays, a [batch, samples] array, or a list of
    ``(waveform, sample_rate)`` pairs (what the audio backend returns; ``sample_rate`` is
    then ignored). Each attribute is scored over the clips whose prompt names it;
    ``all`` means every attribute of the clip right. Prompts that do not parse are skipped.
    Returns ``{"kind", "pitch", ..., "all", "n"}``.
    """
    model = _load_cached(str(path or CLASSIFIER_DIR))
    clips = []
    for w in waveforms:
        rate = sample_rate
        if isinstance(w, tuple):
            w, rate = w
        clips.append(_resample(np.asarray(w, dtype=np.float32).reshape(-1), int(rate)))
    pairs = [(w, parse_prompt(p)) for w, p in zip(clips, prompts)]
    pairs = [(w, s) for w, s in pairs if s is not None]
    if not pairs:
        return {a: 0.0 for a in (*ATTRIBUTES, "all")} | {"n": 0}
    fixed = np.zeros((len(pairs), N_SAMPLES), dtype=np.float32)
    for i, (w, _) in enumerate(pairs):
        fixed[i, : min(N_SAMPLES, len(w))] = w[:N_SAMPLES]
    out = model(audio_to_spec(fixed))
    y = torch.tensor([_labels(s) for _, s in pairs])
    res, all_ok = {}, torch.ones(len(pairs), dtype=torch.bool)
    for i, a in enumerate(ATTRIBUTES):
        mask = y[:, i] >= 0
        ok = (out[a].argmax(-1) == y[:, i]) | ~mask
        all_ok &= ok
        if mask.any():
            res[a] = round(ok[mask].float().mean().item(), 4)
    res["all"] = round(all_ok.float().mean().item(), 4)
    res["n"] = len(pairs)
    return res
