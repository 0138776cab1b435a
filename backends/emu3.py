"""Emu3-Gen (BAAI) from the hub as an autoregressive image model of the studio.

Emu3 writes an image as visual tokens of its own language model's vocabulary (32,768 VQ
codes; a 90x90 grid for its default 720x720 px), in raster order after a text prompt, with
classifier-free guidance against a negative prompt; its VQ decoder paints 8 pixels a code.
The same kind of model as the bundled tiny-ar-shapes and Janus, so it runs through the same
backend (``backends/ar_image.py``), token loop (``backends/accel/_ar_decoding.py``) and
methods (``sjd``, ``lantern``, ``zipar``, ``gsd``). This module adapts transformers' own
classes (``Emu3ForConditionalGeneration`` + ``Emu3Processor``; ``BAAI/Emu3-Gen-hf``, the
checkpoint transformers' Emu3 docs generate images with) to the interface ``ARSession``
reads, following those docs:

- prompt: the processor with ``return_for_image_generation``: BOS, the prompt, then the
  image header ``<|image start|>{rows}*{columns}<|image token|>``; the grid is the
  processor's generation size (ratio 1:1 over ``image_area``: 518,400 px -> 90x90 codes;
  an ``image_area`` in the checkpoint's processor_config.json is read the same way);
- guidance row: a negative prompt through the same processor call (the request's, else
  Emu3's own from its model card), of its own length: the session left-pads the shorter row
  and hides the pads; mixed as ``u + s (c - u)`` over the visual tokens, which is what
  transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` gives on log-softmaxes
  (a constant per row apart) followed by the docs' prefix constraint to visual tokens;
- layout: after each row of visual tokens Emu3 writes an end-of-line token (the docs'
  prefix constraint forces it), so the grid is not contiguous in the sequence: raster
  position ``p`` sits at ``p + p // columns`` after the prefix and is followed by the
  end-of-line when it ends a row. The layout says so (``fillers``, ``sequence_offset``,
  ``input_id``) and the session feeds each row's end-of-line with its last token, places
  tokens, counts cache entries and widens 4-D masks accordingly: the methods see the grid
  only. End-of-frame / end-of-image / EOS after the grid are not needed to paint it;
- pixels: the VQ model decodes the grid; the image processor's mean and std undo the
  normalisation, as its ``postprocess`` does (``tests/test_emu3.py`` checks both agree).

What differs from transformers' loop: one batch of two rows over one ``DynamicCache`` (theirs:
an unbatched second model call for the negative prompt, each with its own cache), so that
the speculative loops can crop rejected drafts; with greedy decoding the tokens are theirs
(``tests/test_emu3.py`` checks it on a tiny random Emu3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

HUB_MODELS = ("BAAI/Emu3-Gen-hf",)
MODEL_TYPE = "emu3"  # transformers' format (config.json's model_type); BAAI's own code says "Emu3"
DEFAULT_GUIDANCE = 3.0  # Emu3's own classifier_free_guidance in BAAI's generation example
# Emu3's own negative prompt (BAAI's generation example and transformers' docs)
DEFAULT_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                           "username, blurry.")
# "Emu3-Gen-hf", "Emu3-Gen"; not Emu3-Chat (trained to read images, not to write them)
HUB_NAME = re.compile(r"emu3.*gen", re.IGNORECASE)


def is_emu3_source(source: str) -> bool:
    """A local folder whose config.json says ``model_type: emu3`` (or BAAI's own ``Emu3``, so
    that the loader says what to use instead), or a hub id naming Emu3-Gen."""
    from backends.catalog import HUB_ID, local_model_type

    model_type = local_model_type(source)
    if model_type is not None:
        return model_type.lower() == MODEL_TYPE
    return bool(HUB_ID.match(source)) and bool(HUB_NAME.search(source.split("/")[-1]))


def check_transformers_format(source: str) -> None:
    """Refuse, in one line, a checkpoint that is not transformers' Emu3 before loading it
    (``BAAI/Emu3-Gen`` is BAAI's own remote code, model_type ``Emu3``)."""
    from backends.janus import checkpoint_model_type
    from backends.types import ModelLoadError

    model_type = checkpoint_model_type(source)
    if model_type != MODEL_TYPE:
        said = f"model_type '{model_type}'" if model_type else "no model_type"
        own = " (BAAI's own Emu3 code)" if model_type.lower() == MODEL_TYPE else ""
        raise ModelLoadError(f"this checkpoint's config.json says {said}{own}, not transformers' '{MODEL_TYPE}': "
                             f"use the transformers-format {' or '.join(HUB_MODELS)}")


@dataclass(frozen=True)
class Emu3Layout:
    """Emu3's token layout, as ``ARSession`` reads it (``TokenLayout`` is the bundled one's)."""

    processor: Any
    pad_id: int
    eol_id: int
    codebook_size: int
    grid: int  # codes per side (90 for Emu3-Gen's default 720 px)
    image_area: int  # the processor's generation area in pixels (grid = sqrt(area) / 8)
    code_ids: tuple[int, ...]  # the language model's id of each VQ code

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def _ids(self, text: str) -> list[int]:
        inputs = self.processor(text=text or "", return_for_image_generation=True, image_area=self.image_area,
                                ratio="1:1", return_tensors="pt")
        return inputs["input_ids"][0].tolist()

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._ids(prompt)

    def negative_ids(self, negative_prompt: str) -> list[int]:
        """The guidance row: the negative prompt with the same image header."""
        return self._ids(negative_prompt)

    def null_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        """No negative prompt asked: Emu3's own."""
        return self._ids(DEFAULT_NEGATIVE_PROMPT)

    # -- where the grid sits in the sequence (module doc) ---------------------------------
    def fillers(self, position: int) -> list[int]:
        """What Emu3 writes after the grid token at raster ``position``: the end-of-line after a row's last."""
        return [self.eol_id] if position % self.grid == self.grid - 1 else []

    def sequence_offset(self, position: int) -> int:
        """Raster position -> offset after the prefix: one end-of-line per finished row before it."""
        return position + position // self.grid

    def input_id(self, code: int) -> int:
        return self.code_ids[code]


def _generation_side(processor: Any, image_area: int) -> int:
    rows, columns = processor.calculate_generate_size("1:1", image_area, processor.downsample_ratio)
    return int(rows)


def _image_area(processor: Any, source: str) -> int:
    """The checkpoint's ``image_area`` when its processor_config.json names one (the processor
    itself does not keep it), else the processor's default (518,400 px)."""
    try:
        saved = type(processor).get_processor_dict(source)[0].get("image_area")
    except (OSError, ValueError):
        saved = None
    return int(saved or processor.image_area)


class Emu3Pipeline:
    """An ``Emu3ForConditionalGeneration`` + ``Emu3Processor`` seen as the studio's AR image
    pipeline (``ARImagePipeline``'s interface: ``layout``, ``transformer``, ``vq``,
    ``token_logits``, ``codebook_vectors``, ``decode``, ``to``), plus ``denoiser``: the
    text model, the module ``token_logits`` calls (evaluations are counted and a cancel
    checked on its forwards; the whole model's own forward never runs)."""

    default_guidance = DEFAULT_GUIDANCE

    def __init__(self, model: Any, processor: Any, image_area: int | None = None):
        self.model = model.eval()
        self.transformer = self.model  # device, dtype and the size the studio reports
        self.denoiser = self.model.model.text_model
        self.vq = self.model.model.vqmodel
        self.processor = processor
        mapping = self.model.vocabulary_mapping
        codebook = int(self.vq.config.codebook_size)
        img2bpe = mapping.img2bpe
        if mapping.eol_token_id is None or any(code not in img2bpe for code in range(codebook)):
            raise ValueError("this Emu3 checkpoint's vocabulary does not name every visual token and the end-of-line")
        area = int(image_area or processor.image_area)
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.model.config.text_config.pad_token_id
        self.layout = Emu3Layout(processor, int(pad), int(mapping.eol_token_id), codebook,
                                 _generation_side(processor, area), area,
                                 tuple(int(img2bpe[code]) for code in range(codebook)))
        self._code_rows = torch.tensor(self.layout.code_ids)
        first = self.layout.code_ids[0]
        self._code_run = self.layout.code_ids == tuple(range(first, first + codebook))  # one ascending run of ids

    @classmethod
    def from_pretrained(cls, source: str, dtype: torch.dtype = torch.float32) -> "Emu3Pipeline":
        """From a hub id (``BAAI/Emu3-Gen-hf``) or a local folder in transformers format
        (model + processor saved together)."""
        from transformers import Emu3ForConditionalGeneration, Emu3Processor

        check_transformers_format(source)
        processor = Emu3Processor.from_pretrained(source)
        model = Emu3ForConditionalGeneration.from_pretrained(source, dtype=dtype)
        return cls(model, processor, _image_area(processor, source))

    def to(self, device: torch.device) -> "Emu3Pipeline":
        self.model.to(device)
        return self

    @property
    def default_size(self) -> tuple[int, int]:
        """The decoded size: the grid times the VQ decoder's upsampling (90 x 8 = 720)."""
        side = self.layout.grid * self.vq.spatial_scale_factor
        return side, side

    def token_logits(self, ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
                     attention_mask: torch.Tensor | None, prefix: bool = False) -> torch.Tensor:
        """Logits over the VQ codes (rows, n, codebook) after ``ids`` (the language model's
        ids: text, visual tokens and end-of-lines alike): ``lm_head`` read at the visual
        tokens only, which is the docs' prefix constraint at a grid position."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.denoiser(input_ids=ids, position_ids=position_ids, cache=cache, use_cache=True, **kwargs)
        return torch.nn.functional.linear(out.last_hidden_state, self._code_head())

    def _code_head(self) -> torch.Tensor:
        """``lm_head``'s rows of the visual tokens, in code order: a view when they are one
        ascending run of ids (Emu3-Gen's 32,768 are), else a gather."""
        weight, ids = self.model.lm_head.weight, self.layout.code_ids
        if self._code_run:
            return weight[ids[0]:ids[0] + len(ids)]
        return weight[self._code_rows.to(weight.device)]

    def codebook_vectors(self) -> torch.Tensor:
        """The VQ code vectors (32,768 x 4 for Emu3): latent neighbours for lantern and gsd."""
        return self.vq.quantize.embedding.weight

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Codes (B, grid*grid) -> PIL images at the model's own size."""
        side = self.layout.grid
        grid = tokens.long().to(self.model.device).view(-1, side, side)
        pixels = self.vq.decode(grid).float()  # (B, 3, H, W), normalised
        image_processor = self.processor.image_processor
        mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, 3, 1, 1)
        arr = ((pixels * std + mean) * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
