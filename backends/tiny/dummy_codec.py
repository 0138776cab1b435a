"""A tiny random MusicGen (T5 text encoder + codec LM decoder + EnCodec) and a tiny random
VITS, built from configs the way transformers' own tests build theirs: offline and
instant. Their audio is noise; they exercise the codec-LM plumbing (delay pattern, CFG,
speculative decoding) and the text-to-speech path."""

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


def dummy_vits(vocab_size: int, seed: int = 0):
    """A random ``VitsModel`` (MMS-TTS layout) at 8 kHz: text in, a short noisy waveform out."""
    from transformers import VitsConfig, VitsModel

    torch.manual_seed(seed)
    config = VitsConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, flow_size=8,
        spectrogram_bins=17, upsample_initial_channel=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1,
        duration_predictor_filter_channels=16, depth_separable_num_layers=1, sampling_rate=8000,
    )
    return VitsModel(config).eval()


def dummy_tts_backend(model_id: str = "dummy-vits", device=None, dtype=None):
    from backends.tts import TTSBackend

    tokenizer = byte_level_tokenizer()  # VITS' own tokenizer needs phonemizer + espeak
    model = dummy_vits(len(tokenizer))
    if device is not None:
        model = model.to(device, dtype)
    return TTSBackend.from_model(model, tokenizer, model_id=model_id)


def register_dummy_codec_model(manager) -> None:
    """``dummy-musicgen`` (codec LM) and ``dummy-vits`` (text-to-speech), both audio."""
    manager.register_factory("audio", "dummy-musicgen", lambda d, t: dummy_codec_backend("dummy-musicgen", d, t))
    manager.register_factory("audio", "dummy-vits", lambda d, t: dummy_tts_backend("dummy-vits", d, t))
