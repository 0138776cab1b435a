import numpy as np
from PIL import Image

from studio import metrics


def test_image_metrics():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    noisy = np.clip(np.asarray(a).astype(int) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    b = Image.fromarray(noisy)
    assert metrics.psnr(a, a) == metrics.PSNR_IDENTICAL
    assert metrics.ssim(a, a) == 1.0
    assert 15 < metrics.psnr(a, b) < 35 and metrics.ssim(a, b) < 0.99


def test_text_agreement():
    assert metrics.text_agreement("a b c", "a b c") == {"exact_match": 1.0, "token_agreement": 1.0}
    assert metrics.text_agreement("a b c d", "a b x d")["token_agreement"] == 0.5


def test_audio_metrics():
    t = np.linspace(0, 1, 16000)
    tone = np.sin(2 * np.pi * 440 * t)
    assert metrics.audio_quality(tone, tone)["lsd"] == 0
    other = metrics.audio_quality(tone, np.sin(2 * np.pi * 880 * t))
    assert other["lsd"] > 10 and other["snr"] < 1
