"""A tiny random Wan 2.1 text-to-video pipeline built from configs, the way diffusers'
tests build theirs: a 2-layer ``WanTransformer3DModel``, a ``AutoencoderKLWan`` with 3
base channels, a 2-layer ``UMT5EncoderModel`` and the character-level tokenizer of
``backends.tiny.dummy``. Instant, offline, deterministic; its frames are noise. It proves
the video plumbing and the video-DiT methods (STA, diffusers' caches), never quality.

Defaults are sized for CPU tests: 9 frames of 64x64 give a latent of 3x8x8 and, with
patches of 1x1x1, a token grid of 3x8x8 (192 tokens), enough to cut into tiles. (Patches
of 1x2x2 as in Wan would need 128x128 frames, whose VAE decode costs ~4x more.)
"""

from __future__ import annotations

import inspect

import torch

from backends.tiny.dummy import char_clip_tokenizer

DEFAULTS = {"height": 64, "width": 64, "num_frames": 9, "max_sequence_length": 32}


def _tiny_wan_pipeline_class():
    from diffusers import WanPipeline

    class TinyWanPipeline(WanPipeline):
        """WanPipeline whose call defaults fit the tiny model (Wan's are 81 x 480 x 832)."""

        def __call__(self, *args, **kwargs):
            for key, value in DEFAULTS.items():
                kwargs.setdefault(key, value)
            return super().__call__(*args, **kwargs)

    # Callers inspect the signature to see which arguments the pipeline takes.
    signature = inspect.signature(WanPipeline.__call__)
    TinyWanPipeline.__call__.__signature__ = signature.replace(parameters=[
        p.replace(default=DEFAULTS[p.name]) if p.name in DEFAULTS else p for p in signature.parameters.values()
    ])
    return TinyWanPipeline


def dummy_wan_pipeline(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 16):
    """WanPipeline with a tiny transformer (patch 1x1x1, supports ``enable_cache``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()
    return _tiny_wan_pipeline_class()(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
    )


def register_dummy_video_models(manager) -> None:
    """Make ``dummy-wan`` loadable for video (tests, ``app.py --dummy-models``)."""
    from backends.video import VideoBackend

    manager.register_factory(
        "video", "dummy-wan", lambda d, t: VideoBackend("dummy-wan", dummy_wan_pipeline().to(d, t), d, t)
    )
