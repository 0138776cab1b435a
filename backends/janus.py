"""Janus / Janus-Pro (DeepSeek) from the hub as an autoregressive image model of the studio.

Janus-Pro writes an image as 576 VQ codes (a 24x24 grid, 16,384 codes) in raster order
after a text prompt, with classifier-free guidance, and its VQ decoder paints 384x384
pixels: the same kind of model as the bundled tiny-ar-shapes, so it runs through the same
backend (``backends/ar_image.py``), token loop (``backends/accel/_ar_decoding.py``) and
methods (``sjd``, ``lantern``, ``zipar``, ``gsd``). This module only adapts transformers'
own classes (``JanusForConditionalGeneration`` + ``JanusProcessor``, the
``deepseek-community/Janus-Pro-1B`` / ``-7B`` checkpoints in transformers format) to the
pipeline interface ``ARSession`` reads, following ``generate(generation_mode="image")``:

- prompt: the processor's chat template around the prompt as a user turn (when the
  checkpoint has one), then the processor in image mode, which appends the begin-of-image
  token;
- guidance row: the prompt with every token other than BOS and begin-of-image replaced by
  the pad token (same length as the prompt row); mixed as ``u + s (c - u)``, as
  transformers' ``ClassifierFreeGuidanceLogitsProcessor`` does;
- the prefix goes through the text embeddings; an image token through the generation
  embeddings and aligner; the image logits come from the generation head (not ``lm_head``)
  over the language model's hidden states;
- pixels: the VQ model decodes the codes; the image processor's mean and std undo the
  normalisation, as its ``postprocess`` does (written out here: transformers 5.24's PIL
  image processor fails in ``postprocess`` on the channels-last arrays that
  ``decode_image_tokens`` returns; the test checks both paint the same pixels).

What differs from transformers' loop: ours keeps a ``DynamicCache`` (theirs a static one),
so that the speculative loops can crop rejected drafts; with greedy decoding the tokens
are theirs (``tests/test_janus.py`` checks it on a tiny random Janus).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

HUB_MODELS = ("deepseek-community/Janus-Pro-1B", "deepseek-community/Janus-Pro-7B")
MODEL_TYPE = "janus"  # transformers' format (config.json's model_type)
DEEPSEEK_MODEL_TYPE = "multi_modality"  # DeepSeek's own format (deepseek-ai/Janus-Pro-*): their code, not transformers'
DEFAULT_GUIDANCE = 5.0  # Janus-Pro's own cfg_weight (its generation config's guidance_scale)
# "Janus-Pro-1B", "Janus-1.3B"; not JanusFlow (rectified flow, no image tokens)
HUB_NAME = re.compile(r"janus(?!-?flow)", re.IGNORECASE)


def is_janus_source(source: str) -> bool:
    """A local folder whose config.json says ``model_type: janus`` (or DeepSeek's own
    ``multi_modality``), or a hub id naming Janus."""
    from backends.catalog import HUB_ID, local_model_type

    model_type = local_model_type(source)
    if model_type is not None:  # DeepSeek's own format too, so that the loader says what to use instead
        return model_type in (MODEL_TYPE, DEEPSEEK_MODEL_TYPE)
    return bool(HUB_ID.match(source)) and bool(HUB_NAME.search(source.split("/")[-1]))


def checkpoint_model_type(source: str) -> str:
    """``model_type`` of the checkpoint's config.json (a local folder's, or the hub's), read
    as plain JSON: transformers' AutoConfig fails on a model type it does not know."""
    from transformers import PretrainedConfig

    from backends.catalog import local_model_type

    model_type = local_model_type(source)
    if model_type is None:
        model_type = str(PretrainedConfig.get_config_dict(source)[0].get("model_type") or "")
    return model_type


def check_transformers_format(source: str) -> None:
    """Refuse, in one line, a checkpoint that is not transformers' Janus before loading it
    (``deepseek-ai/Janus-Pro-7B`` is DeepSeek's own ``multi_modality`` code)."""
    from backends.types import ModelLoadError

    model_type = checkpoint_model_type(source)
    if model_type != MODEL_TYPE:
        said = f"model_type '{model_type}'" if model_type else "no model_type"
        own = " (DeepSeek's own Janus code)" if model_type == DEEPSEEK_MODEL_TYPE else ""
        raise ModelLoadError(f"this checkpoint's config.json says {said}{own}, not transformers' '{MODEL_TYPE}': "
                             f"use the transformers-format {' or '.join(HUB_MODELS)}")


@dataclass(frozen=True)
class JanusLayout:
    """Janus's token layout, as ``ARSession`` reads it (``TokenLayout`` is the bundled one's)."""

    processor: Any
    bos_id: int | None
    pad_id: int
    boi_id: int
    codebook_size: int
    grid: int  # tokens per side (24 for Janus-Pro's 384 px)

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def prompt_ids(self, prompt: str) -> list[int]:
        text = prompt or ""
        if getattr(self.processor, "chat_template", None):
            turn = [{"role": "user", "content": [{"type": "text", "text": text}]}]
            text = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        return self.processor(text=text, generation_mode="image", return_tensors="pt")["input_ids"][0].tolist()

    def null_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        """The unconditional row: the prompt's BOS and begin-of-image kept, the rest pads."""
        keep = {self.bos_id, self.boi_id}
        return [t if t in keep else self.pad_id for t in (prompt_ids or [])]


def _special_ids(model: Any, processor: Any) -> tuple[int | None, int, int]:
    """(BOS, pad, begin-of-image): the generation config's, as ``generate`` uses them, else
    the tokenizer's (transformers 5.24 drops ``generation_kwargs`` when it loads a
    generation config, so the begin-of-image id is read off the processor's token)."""
    tokenizer = processor.tokenizer
    config = model.generation_config
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    boi = (getattr(config, "generation_kwargs", None) or {}).get("boi_token_id")
    if boi is None:
        boi = tokenizer.convert_tokens_to_ids(processor.image_start_token)
    if pad is None:
        raise ValueError("this Janus checkpoint names no pad token for its guidance row")
    return bos, int(pad), int(boi)


class JanusPipeline:
    """A ``JanusForConditionalGeneration`` + ``JanusProcessor`` seen as the studio's AR image
    pipeline (``ARImagePipeline``'s interface: ``layout``, ``transformer``, ``vq``,
    ``token_logits``, ``codebook_vectors``, ``decode``, ``to``), plus ``denoiser``: the
    language model, the module ``token_logits`` calls."""

    default_guidance = DEFAULT_GUIDANCE

    def __init__(self, model: Any, processor: Any):
        self.model = model.eval()
        self.transformer = self.model  # device, dtype and the size the studio reports
        # the module each forward calls (``token_logits``): where evaluations are counted and a
        # cancel or time limit is checked (the whole model's own forward never runs)
        self.denoiser = self.model.model.language_model
        self.vq = self.model.model.vqmodel
        self.processor = processor
        bos, pad, boi = _special_ids(self.model, processor)
        grid_h, grid_w = self.vq.quantize.quant_state_dims
        if grid_h != grid_w:
            raise ValueError("this Janus checkpoint's token grid is not square")
        self.layout = JanusLayout(processor, bos, pad, boi, int(self.vq.config.num_embeddings), int(grid_h))

    @classmethod
    def from_pretrained(cls, source: str, dtype: torch.dtype = torch.float32) -> "JanusPipeline":
        """From a hub id (``deepseek-community/Janus-Pro-1B``) or a local folder in
        transformers format (model + processor saved together)."""
        from transformers import JanusForConditionalGeneration, JanusProcessor

        check_transformers_format(source)
        processor = JanusProcessor.from_pretrained(source)
        model = JanusForConditionalGeneration.from_pretrained(source, dtype=dtype)
        return cls(model, processor)

    def to(self, device: torch.device) -> "JanusPipeline":
        self.model.to(device)
        return self

    @property
    def default_size(self) -> tuple[int, int]:
        """The decoded size: the grid times the VQ decoder's upsampling (24 x 16 = 384)."""
        side = self.layout.grid * 2 ** (len(self.vq.config.channel_multiplier) - 1)
        return side, side

    def token_logits(self, ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
                     attention_mask: torch.Tensor | None, prefix: bool = False) -> torch.Tensor:
        """Logits over the image codes (rows, n, codebook) after ``ids``: text ids (the prefix)
        or image codes, each through its own embedding; the generation head reads them off."""
        if prefix:
            embeds = self.model.get_input_embeddings()(ids)
        else:
            embeds = self.model.prepare_embeddings_for_image_generation(ids)
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.denoiser(inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True, **kwargs)
        return self.model.model.generation_head(out.last_hidden_state)

    def codebook_vectors(self) -> torch.Tensor:
        """The VQ code vectors (16,384 x 8 for Janus-Pro): latent neighbours for lantern and gsd."""
        return self.vq.quantize.embedding.weight

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Image tokens (B, grid*grid) -> PIL images at the model's own size."""
        pixels = self.vq.decode(tokens.long().to(self.model.device)).float()  # (B, 3, H, W), normalised
        image_processor = self.processor.image_processor
        mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, 3, 1, 1)
        arr = ((pixels * std + mean) * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
