"""A tiny random MusicGen (T5 text encoder + codec LM decoder + EnCodec) built from configs,
the way transformers' own MusicGen tests build theirs: offline and instant. Its audio is
noise; it exercises the codec-LM plumbing (delay pattern, CFG, speculative decoding)."""

from __future__ import annotations

import torch

from backends.tiny.dummy import byte_level_tokenizer

CODEBOOKS, CODEBOOK_SIZE = 4, 64


def dummy_musicgen(layers: int = 4, seed: int = 0, text_vocab: int = 300):
    """A random ``MusicgenForConditionalGeneration``: 4 codebooks of 64 codes, 8 kHz, 500 frames/s."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    torch.manual_seed(seed)
    text = T5Config(vocab_size=text_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=0)
    # 4 codebooks at 500 frames/s need 4 * 500 * 10 bits/s = 20 kbps
    codec = EncodecConfig(hidden_size=16, num_filters=4, codebook_size=CODEBOOK_SIZE, codebook_dim=16,
                          upsampling_ratios=[4, 4], num_residual_layers=1, sampling_rate=8000, audio_channels=1,
                          target_bandwidths=[20.0], compress=2, num_lstm_layers=1)
    special = CODEBOOK_SIZE  # MusicGen's pad/start id is one past the codebook (2048 for the real ones)
    decoder = MusicgenDecoderConfig(vocab_size=CODEBOOK_SIZE, hidden_size=32, num_hidden_layers=layers,
                                    num_attention_heads=4, ffn_dim=64, num_codebooks=CODEBOOKS,
                                    max_position_embeddings=512, pad_token_id=special, bos_token_id=special,
                                    decoder_start_token_id=special)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())
    model = MusicgenForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = special
    gen.guidance_scale = 3.0
    return model


def dummy_codec_backend(model_id: str = "dummy-musicgen", device=None, dtype=None):
    """``dummy-musicgen`` (4 layers) with its paired 1-layer draft."""
    from backends.codec_lm import CodecLMBackend

    tokenizer = byte_level_tokenizer()
    target = dummy_musicgen(layers=4, seed=0, text_vocab=len(tokenizer))
    draft = dummy_musicgen(layers=1, seed=1, text_vocab=len(tokenizer))
    if device is not None:
        target, draft = target.to(device, dtype), draft.to(device, dtype)
    return CodecLMBackend.from_model(target, tokenizer, model_id=model_id,
                                     drafts={"dummy-musicgen-draft": (draft, tokenizer)})


def register_dummy_codec_model(manager) -> None:
    manager.register_factory("audio", "dummy-musicgen", lambda d, t: dummy_codec_backend("dummy-musicgen", d, t))
