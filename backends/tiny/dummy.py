"""Tiny random pipelines built from configs, the way diffusers' own tests build theirs
(``get_dummy_components``): instant, offline, deterministic. Used by the test suite and
as a last-resort model when the bundled assets are missing. Their output is noise: they
prove plumbing, never quality."""

from __future__ import annotations

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def char_clip_tokenizer():
    """A character-level CLIP tokenizer: the vocab holds every character with and without
    the end-of-word suffix and there are no merges, so any prompt tokenizes offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def _clip_text_encoder(vocab_size: int, hidden: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
        max_position_embeddings=32, projection_dim=hidden,
    )
    return CLIPTextModel(config).eval()


def _vae(latent_channels: int = 4, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=4, layers_per_block=1, shift_factor=shift_factor,
    ).eval()


def dummy_sd_pipeline(seed: int = 0):
    """StableDiffusionPipeline with a 3-level UNet (so DeepCache has depth to skip)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    tokenizer = char_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        vae=_vae(), text_encoder=_clip_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe


def dummy_sd_sibling(pipe, seed: int = 1):
    """A narrower UNet sharing ``pipe``'s VAE, text encoder, tokenizer and scheduler: a
    T-Stitch sibling of ``dummy_sd_pipeline`` (random weights, like the model itself)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(pipe.unet.config)
    config["block_out_channels"] = (4, 8, 8)
    config["attention_head_dim"] = 2
    unet = UNet2DConditionModel.from_config(config).eval()
    return StableDiffusionPipeline(
        unet=unet, scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def dummy_flux_pipeline(seed: int = 0, layers: int = 2, single_layers: int = 4):
    """FluxPipeline with a tiny transformer (supports ``enable_cache``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    tokenizer = char_clip_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0), text_encoder=_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer, text_encoder_2=_clip_text_encoder(len(tokenizer)), tokenizer_2=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = 8  # 8 latents * vae scale 2 = 16 px by default
    return pipe


def register_dummy_models(manager) -> None:
    """Make ``dummy-sd``, ``dummy-flux``, ``dummy-ar`` (image; the last an AR token model), ``dummy-llama``, ``dummy-dllm`` (text), ``dummy-wan``
    (video) and ``dummy-musicgen`` (audio, codec LM) loadable (tests, ``app.py --dummy-models``)."""
    from backends.image import ImageBackend

    manager.register_factory("image", "dummy-sd", lambda d, t: ImageBackend("dummy-sd", dummy_sd_pipeline().to(d, t), d, t))
    manager.register_factory("image", "dummy-flux", lambda d, t: ImageBackend("dummy-flux", dummy_flux_pipeline().to(d, t), d, t))
    manager.register_factory("image", "dummy-ar", _dummy_ar_backend)
    register_dummy_text_model(manager)
    register_dummy_dllm(manager)
    from backends.tiny.dummy_video import register_dummy_video_models

    register_dummy_video_models(manager)
    from backends.tiny.dummy_codec import register_dummy_codec_model

    register_dummy_codec_model(manager)


def byte_level_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300):
    """A small byte-level BPE trained offline on ``corpus`` (any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus or ["def draw(shape, colour):\n    return shape + colour\n", "a red circle at top left on white"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def dummy_llama(layers: int = 2, seed: int = 0):
    """A tiny random LlamaForCausalLM and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def register_dummy_text_model(manager) -> None:
    """Make ``dummy-llama`` (text) loadable."""
    from backends.text import TextBackend

    def factory(device, dtype):
        model, tokenizer = dummy_llama()
        return TextBackend.from_model(model.to(device), tokenizer, model_id="dummy-llama")

    manager.register_factory("text", "dummy-llama", factory)


def dummy_dllm(layers: int = 2, seed: int = 0):
    """A tiny random masked-diffusion LM (Llama layout, a ``<|mask|>`` token) and its tokenizer."""
    model, tokenizer = dummy_llama(layers, seed)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|mask|>"]})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model.eval(), tokenizer


def register_dummy_dllm(manager) -> None:
    """Make ``dummy-dllm`` (text, diffusion LM) loadable."""
    from backends.diffusion_lm import DiffusionLMBackend

    def factory(device, dtype):
        model, tokenizer = dummy_dllm()
        return DiffusionLMBackend.from_model(model.to(device), tokenizer, model_id="dummy-dllm",
                                             mask_id=tokenizer.convert_tokens_to_ids("<|mask|>"))

    manager.register_factory("text", "dummy-dllm", factory)


def _dummy_ar_backend(device, dtype):
    """A random-weight LlamaGen-style token model (``backends/ar_image.py``)."""
    from backends.ar_image import ARImageBackend
    from backends.tiny.ar_image import tiny_random_pipeline

    pipe = tiny_random_pipeline(seed=0)
    pipe.transformer.to(device, dtype)
    pipe.vq.to(device, dtype)
    return ARImageBackend.from_pipeline(pipe, "dummy-ar")
