"""Text-to-image with an autoregressive token model (LlamaGen style): a Llama writes VQ codes
in raster order after the prompt, with classifier-free guidance, and the VQ decoder paints them.

The image tab treats it like any image model (``ImageBackend.from_pretrained`` hands a
folder with a ``layout.json``, a Janus / Janus-Pro checkpoint (``backends/janus.py``:
``deepseek-community/Janus-Pro-1B`` or a local folder), or an Emu3-Gen one (``backends/emu3.py``:
``BAAI/Emu3-Gen-hf``), to this class); the acceleration methods that apply are the
AR-image ones (family ``ar-image``: ``sjd``, ``zipar``, ``lantern``, ``gsd``, and the text
methods ``speculative`` with a draft model and ``static_cache``), which replace the token
loop in the plan (``ARImagePlan.decoder``), as text methods replace ``generate``. A bundled
model names its paired draft in the catalog (``tiny-ar-shapes`` -> ``tiny-ar-shapes-draft``,
a 1-layer model of the same layout), loaded on first use by ``get_draft``.

Request parameters: ``guidance`` (CFG scale, 1 or less = no null-prompt row), ``temperature``
(0 = greedy) and ``top_k`` (0 = every code); ``steps`` has no meaning for a token model
and is ignored; ``width``/``height`` resize the decoded image (default 64x64, the
shapes classifier's size, where the tokenizer paints 32x32; Janus-Pro: 384x384, its own;
Emu3-Gen: 720x720). Default guidance: 1.5 (the bundled model's), 5 for Janus, 3 for Emu3 (their own).
A negative prompt is read by Emu3 (its guidance row); the others say they ignored it.
Result figures (``Result.extra``): tokens, transformer forwards and tokens per forward,
the work the parallel loops save.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel._ar_decoding import ARSampling, ARSession, plain_loop
from backends.base import Backend, ProgressFn, module_bytes
from backends.plan import ARImagePlan
from backends.timing import StageTimer
from backends.types import Request, ValidationError

FAMILY = "ar-image"
DEFAULT_SIZE = 64
DEFAULT_GUIDANCE = 1.5
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 0


def is_ar_image_source(source: str) -> bool:
    """A local folder saved by ``ARImagePipeline.save_pretrained``, or a Janus or Emu3-Gen
    checkpoint (a hub id naming it, or a folder whose config.json says ``model_type: janus``
    / ``emu3``)."""
    from pathlib import Path

    from backends.emu3 import is_emu3_source
    from backends.janus import is_janus_source

    if (Path(source) / "layout.json").is_file() and (Path(source) / "transformer").is_dir():
        return True
    return is_janus_source(source) or is_emu3_source(source)


def load_ar_pipeline(source: str, dtype: torch.dtype) -> Any:
    """The bundled layout (``ARImagePipeline``), or Janus / Emu3 through transformers
    (``JanusPipeline``, ``Emu3Pipeline``)."""
    from backends.emu3 import Emu3Pipeline, is_emu3_source
    from backends.janus import JanusPipeline, is_janus_source
    from backends.tiny.ar_image import ARImagePipeline

    if is_janus_source(source):
        return JanusPipeline.from_pretrained(source, dtype=dtype)
    if is_emu3_source(source):
        return Emu3Pipeline.from_pretrained(source, dtype=dtype)
    return ARImagePipeline.from_pretrained(source, dtype=dtype)


def _same_weights(a: Any, b: Any) -> bool:
    """Whether two modules hold equal tensors under the same names (a draft's VQ tokenizer
    copied from its target's)."""
    if not (isinstance(a, torch.nn.Module) and isinstance(b, torch.nn.Module)):
        return False
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k])
        for k in mine)


class ARImageBackend(Backend):
    modality = "image"
    unused_params = ("steps",)  # one forward per token (or fewer): no denoising schedule

    def __init__(self, model_id: str, pipe: Any, device: torch.device, dtype: torch.dtype,
                 draft_id: str | None = None):
        from backends.catalog import find_bundled

        super().__init__(model_id, device, dtype)
        self.pipe = pipe
        self.family = FAMILY
        # the paired draft ('auto' in the speculative method), as text models name theirs
        self.draft_id = draft_id if draft_id is not None else getattr(find_bundled(model_id), "draft", None)
        self.drafts: dict[str, Any] = {}  # draft pipelines, loaded once and kept (tests pre-seed them)

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "ARImageBackend":
        # fp32 on CPU; the codebook lookup and the sampling ratios of the speculative loops
        # want full-precision probabilities, so half precision is only used on accelerators
        pipe = load_ar_pipeline(source, dtype)
        return cls(model_id, pipe.to(device), device, dtype)

    @classmethod
    def from_pipeline(cls, pipe: Any, model_id: str = "in-memory",
                      drafts: dict[str, Any] | None = None) -> "ARImageBackend":
        """Wrap an in-memory pipeline (tests: a tiny random one); ``drafts`` pre-seeds the
        draft cache, its first entry being the paired draft."""
        device = next(pipe.transformer.parameters()).device
        backend = cls(model_id, pipe, device, next(pipe.transformer.parameters()).dtype,
                      draft_id=next(iter(drafts or {}), None))
        backend.drafts.update(drafts or {})
        return backend

    def get_draft(self, draft_id: str) -> tuple[Any, None]:
        """(draft pipeline, None): loaded once by the same ``from_pretrained`` path as the
        model, on its device and dtype (the None stands where a text draft has its tokenizer).
        A draft of another token layout is refused before it is kept, so a refusal leaves no
        draft behind in memory."""
        from backends.accel.speculative import bundled_draft_layers, check_same_layout, pipe_layers, shallower
        from backends.catalog import resolve_source
        from backends.tiny.ar_image import ARImagePipeline, read_layout
        from backends.types import ModelLoadError

        if draft_id not in self.drafts:
            source = resolve_source(draft_id)
            if not is_ar_image_source(source):
                raise ModelLoadError(f"draft model '{draft_id}' is not an autoregressive image model")
            if read_layout(source) != self.pipe.layout:  # refused from its layout.json, before any weights load
                raise ValidationError(f"draft model '{draft_id}' has another token layout (codebook, prompt words "
                                      "or grid) than the target: its tokens would mean other things")
            layers, depth = bundled_draft_layers(draft_id), pipe_layers(self.pipe)  # its config.json: no weights
            if not shallower(layers, depth):
                raise ValidationError(f"draft model '{draft_id}' has {layers} layer(s), as many as or more than this "
                                      f"model's {depth}: drafting with it would only add work")
            try:
                draft = ARImagePipeline.from_pretrained(source, dtype=self.dtype).to(self.device)
            except Exception as exc:  # noqa: BLE001 - any loader failure is one line for the user
                raise ModelLoadError(f"could not load draft model '{draft_id}' ({type(exc).__name__})") from exc
            check_same_layout(self.pipe, draft, draft_id)
            if _same_weights(draft.vq, self.pipe.vq):
                draft.vq = self.pipe.vq  # a bundled draft ships its target's tokenizer: keep one copy
            self.drafts[draft_id] = draft
        return self.drafts[draft_id], None

    @property
    def denoiser(self) -> torch.nn.Module | None:
        """The module called once per forward (evaluations are counted and a cancel checked
        on its forward): the pipeline's ``denoiser`` where the module it calls is not its
        ``transformer`` (Janus: the language model inside the whole model)."""
        if self.pipe is None:
            return None
        denoiser = getattr(self.pipe, "denoiser", None)  # a module's truth is its length, if it has one
        return denoiser if denoiser is not None else self.pipe.transformer

    def memory_bytes(self) -> int:
        """The model and every draft it holds, tokenizers included (a VQ a draft shares with
        the target is counted once)."""
        if self.pipe is None:
            return 0
        return module_bytes(self.pipe.transformer, self.pipe.vq,
                            *(module for d in self.drafts.values() for module in (d.transformer, d.vq)))

    def weight_bytes(self) -> int:
        return module_bytes(self.pipe.transformer, self.pipe.vq) if self.pipe is not None else 0  # not the drafts

    def unload(self) -> None:
        self.pipe = None
        self.drafts.clear()

    def default_size(self) -> tuple[int, int]:
        """The bundled model: 64 (the shapes classifier's size); a hub model: its own (Janus-Pro 384)."""
        return getattr(self.pipe, "default_size", None) or (DEFAULT_SIZE, DEFAULT_SIZE)

    def build_plan(self, request: Request) -> ARImagePlan:
        params = request.params
        if params.get("init_image") or params.get("strength") is not None:
            raise ValidationError(f"model '{self.model_id}' writes image tokens from the prompt; it does not take an "
                                  "init image (img2img)")
        default_guidance = getattr(self.pipe, "default_guidance", DEFAULT_GUIDANCE)
        sampling = ARSampling(
            guidance=float(params.get("guidance") if params.get("guidance") is not None else default_guidance),
            temperature=float(params.get("temperature") if params.get("temperature") is not None
                              else DEFAULT_TEMPERATURE),
            top_k=int(params.get("top_k") or DEFAULT_TOP_K),
        )
        default_height, default_width = self.default_size()
        size = (int(params.get("height") or default_height), int(params.get("width") or default_width))
        plan = ARImagePlan(prompt=request.prompt, sampling=sampling, decoder=plain_loop, size=size, seed=request.seed,
                           negative_prompt=request.negative_prompt or None)
        plan.notes.extend(self._prompt_notes(request, sampling))
        if size != (default_height, default_width):
            plan.notes.append(f"'{self.model_id}' paints {default_width}x{default_height} (its token grid); the image "
                              f"was resized to {size[1]}x{size[0]}, which adds no detail")
        return plan

    def _prompt_notes(self, request: Request, sampling: ARSampling) -> list[str]:
        """What of the request the model cannot read, said instead of silently dropped: a
        tiny token model knows a few dozen words and has no negative prompt; a model that
        reads one (Emu3) reads it only in the guidance row, which guidance <= 1 leaves out."""
        notes = []
        layout = self.pipe.layout
        ignored = layout.ignored_words(request.prompt) if hasattr(layout, "ignored_words") else []
        if ignored:
            notes.append(f"'{self.model_id}' ignored the words {', '.join(ignored)}: it reads the first "
                         f"{layout.prompt_len} words of its own vocabulary ({', '.join(layout.words)})")
        if request.negative_prompt and not hasattr(layout, "negative_ids"):  # Emu3 reads one
            notes.append(f"'{self.model_id}' has no negative prompt; it was ignored")
        elif request.negative_prompt and not sampling.uses_cfg:
            notes.append(f"the negative prompt was ignored: guidance {sampling.guidance:g} runs no classifier-free "
                         "guidance, where the negative prompt is read (use a guidance above 1)")
        return notes

    def generate(self, plan: ARImagePlan, timer: StageTimer, progress: ProgressFn | None) -> Any:
        session = ARSession(self.pipe, plan.prompt, plan.sampling, plan.seed, self.device,
                            negative_prompt=plan.negative_prompt)
        with timer.stage("denoise"):  # the token loop: the stage the methods act on
            tokens = plan.decoder(session, progress)
        with timer.stage("decode"):
            image = self.pipe.decode(tokens)[0]
        height, width = plan.size
        if image.size != (width, height):
            from PIL import Image

            image = image.resize((width, height), Image.BILINEAR)
        n = int(tokens.numel())
        plan.extra.update(tokens=n, transformer_forwards=session.forwards,
                          tokens_per_forward=round(n / max(1, session.forwards), 3))
        return image
