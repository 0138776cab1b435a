"""Text-to-image through any diffusers pipeline (UNet or DiT denoiser)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from backends.base import Backend, ProgressFn, module_bytes
from backends.catalog import find_bundled, resolve_source
from backends.params import default
from backends.plan import DiffusionPlan, Guidance, tracking_branches
from backends.timing import StageTimer, timed_method
from backends.types import ModelLoadError, Request, ValidationError

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def pipe_denoiser(pipe: Any) -> torch.nn.Module | None:
    """The network a pipeline runs at every step: its UNet or its transformer."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def pipeline_family(pipe: Any) -> str:
    """'unet' or 'dit': decides which caching methods can patch the denoiser."""
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    if getattr(pipe, "transformer", None) is not None:
        return "dit"
    return "unknown"


def seeded_generator(seed: int) -> torch.Generator:
    # A CPU generator gives the same noise on every device, so a seed means one image.
    return torch.Generator(device="cpu").manual_seed(int(seed))


# Pipelines that run classifier-free guidance as separate cond / uncond passes of the
# denoiser although they take a plain ``guidance_scale`` (matched over the class's bases, so
# a subclass counts too). diffusers has no flag for it; this table is where it is declared.
SEPARATE_CFG_PIPELINES = frozenset({
    "WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanVACEPipeline", "WanAnimatePipeline",
    "SkyReelsV2Pipeline", "CogView4Pipeline", "Lumina2Pipeline", "ChromaPipeline", "ZImagePipeline",
    "CosmosTextToWorldPipeline",
})


def batches_cfg(pipe: Any) -> bool:
    """Whether the pipeline runs guidance as one [uncond, cond] batch (SD, SDXL, SD3, PixArt,
    Sana, CogVideoX, LTX, AudioLDM, the bundled pipelines) rather than as separate passes:
    the pipelines declared in ``SEPARATE_CFG_PIPELINES`` and every true-CFG pipeline (a
    ``true_cfg_scale`` argument: FLUX, Qwen-Image, HunyuanVideo)."""
    cls = type(pipe)
    if any(base.__name__ in SEPARATE_CFG_PIPELINES for base in cls.__mro__):
        return False
    return "true_cfg_scale" not in inspect.signature(cls.__call__).parameters


class DiffusionBackend(Backend):
    """Shared by image, video and audio diffusion: the pipeline call, stage timing, CFG.

    Stages: ``encode`` (text encoders), ``decode`` (VAE / vocoder), ``denoise`` (the
    rest of the loop), ``total``.
    """

    def __init__(self, model_id: str, pipe: Any, device: torch.device, dtype: torch.dtype):
        super().__init__(model_id, device, dtype)
        self.pipe = pipe
        self.family = pipeline_family(pipe)
        self.call_params = set(inspect.signature(pipe.__call__).parameters)
        self.cfg_batched = batches_cfg(pipe)
        self.base_scheduler = pipe.scheduler
        # T-Stitch: the smaller sibling pipelines, loaded on first use and kept (tests pre-seed it)
        self.sibling_id = getattr(find_bundled(model_id), "sibling", None)
        self.siblings: dict[str, Any] = {}
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "DiffusionBackend":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
        return cls(model_id, pipe.to(device), device, dtype)

    @property
    def denoiser(self) -> torch.nn.Module | None:
        return pipe_denoiser(self.pipe)

    def memory_bytes(self) -> int:
        # a sibling (T-Stitch) is kept whole (its VAE and text encoder are compared with
        # this model's): all of it is held in memory, so all of it counts
        siblings = [getattr(p, n, None) for p in self.siblings.values() for n in p.components]
        return module_bytes(*(getattr(self.pipe, n, None) for n in self.pipe.components), *siblings)

    def weight_bytes(self) -> int:
        return module_bytes(*(getattr(self.pipe, n, None) for n in self.pipe.components))  # not the siblings

    def get_sibling(self, model_id: str) -> Any:
        """The pipeline of a smaller sibling model (T-Stitch), loaded once by the same
        ``from_pretrained`` path as this model, on its device and dtype."""
        if model_id not in self.siblings:
            source = resolve_source(model_id)
            try:
                sibling = type(self).from_pretrained(model_id, source, self.device, self.dtype)
            except Exception as exc:  # noqa: BLE001 - any loader failure is one line for the user
                raise ModelLoadError(f"could not load the small model '{model_id}' as a diffusers pipeline "
                                     f"({type(exc).__name__})") from exc
            self.siblings[model_id] = sibling.pipe
        return self.siblings[model_id]

    def unload(self) -> None:
        self.pipe = None

    @property
    def uses_embedded_guidance(self) -> bool:
        """FLUX.1-dev style: guidance is an input of the transformer, not a second pass."""
        config = getattr(self.denoiser, "config", {})
        return bool(getattr(config, "guidance_embeds", False))

    def guidance_kwargs(self, guidance: float, negative_prompt: str) -> dict[str, Any]:
        if "true_cfg_scale" in self.call_params:
            if self.uses_embedded_guidance:
                return {"guidance_scale": guidance}
            return {"true_cfg_scale": guidance, "negative_prompt": negative_prompt or ""}
        kwargs: dict[str, Any] = {"guidance_scale": guidance}
        if "negative_prompt" in self.call_params:
            kwargs["negative_prompt"] = negative_prompt or None
        return kwargs

    def guidance_plan(self, kwargs: dict[str, Any]) -> Guidance:
        """How many denoiser passes per step the guidance costs (2 with CFG, 1 without),
        and whether they run as one batch or as separate, branch-marked calls."""
        if "true_cfg_scale" in kwargs:
            scale = float(kwargs["true_cfg_scale"])
            passes = 2 if scale > 1 else 1
        else:
            scale = float(kwargs.get("guidance_scale", 0))
            passes = 2 if scale > 1 and not self.uses_embedded_guidance else 1
        return Guidance(scale=scale, passes=passes, batched=self.cfg_batched)

    def base_plan(self, request: Request) -> DiffusionPlan:
        params = request.params
        kwargs: dict[str, Any] = {"prompt": request.prompt, "generator": seeded_generator(request.seed)}
        kwargs.update(self.guidance_kwargs(float(params.get("guidance", default(self.modality, "guidance"))),
                                           request.negative_prompt))
        tokenizer = getattr(self.pipe, "tokenizer_2", None)
        if "max_sequence_length" in self.call_params and tokenizer is not None:
            kwargs["max_sequence_length"] = min(512, int(getattr(tokenizer, "model_max_length", 512)))
        return DiffusionPlan(kwargs=kwargs, steps=int(params.get("steps", default(self.modality, "steps"))),
                             guidance=self.guidance_plan(kwargs))

    def pipeline_kwargs(self, plan: DiffusionPlan, progress: ProgressFn | None = None) -> dict[str, Any]:
        """The pipeline call of ``plan``: its kwargs, the step count and one step-end
        callback running the plan's callbacks in order, then the progress report."""
        kwargs = {**plan.kwargs, "num_inference_steps": plan.steps}
        callbacks, steps = list(plan.callbacks), plan.steps
        tensor_inputs = sorted({name for cb in callbacks for name in getattr(cb, "tensor_inputs", ())})

        def on_step_end(pipe, step, timestep, tensors):
            out: dict[str, Any] = {}
            for cb in callbacks:
                out.update(cb(pipe, step, timestep, {**tensors, **out}) or {})
            if progress is not None:
                progress(step + 1, steps, "denoise")
            return out

        if callbacks or progress is not None:
            kwargs["callback_on_step_end"] = on_step_end
            kwargs["callback_on_step_end_tensor_inputs"] = tensor_inputs
        return kwargs

    def generate(self, plan: DiffusionPlan, timer: StageTimer, progress: ProgressFn | None) -> Any:
        kwargs = self.pipeline_kwargs(plan, progress)
        with self._timed_stages(timer), tracking_branches(self.denoiser, plan.guidance):
            output = self.pipe(**kwargs)
        timer.seconds["denoise"] = max(
            0.0, timer.seconds["total_pipe"] - timer.seconds.get("encode", 0.0) - timer.seconds.get("decode", 0.0)
        )
        del timer.seconds["total_pipe"]
        return self.extract_output(output)

    def _timed_stages(self, timer: StageTimer):
        import contextlib

        stack = contextlib.ExitStack()
        for name in TEXT_ENCODER_NAMES:
            stack.enter_context(timed_method(getattr(self.pipe, name, None), "forward", timer, "encode"))
        for name, attr in (("vae", "decode"), ("vocoder", "forward")):
            stack.enter_context(timed_method(getattr(self.pipe, name, None), attr, timer, "decode"))
        stack.enter_context(timer.stage("total_pipe"))
        return stack

    def extract_output(self, output: Any) -> Any:
        raise NotImplementedError


class ImageBackend(DiffusionBackend):
    modality = "image"

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> Any:
        """An autoregressive token model's folder (``layout.json``: the bundled tiny-ar-shapes)
        loads as an ``ARImageBackend``; every other folder or hub id as a diffusers pipeline."""
        from backends.ar_image import ARImageBackend, is_ar_image_source

        if is_ar_image_source(source):
            return ARImageBackend.from_pretrained(model_id, source, device, dtype)
        return super().from_pretrained(model_id, source, device, dtype)

    def default_size(self) -> tuple[int, int]:
        from backends.catalog import find_bundled

        entry = find_bundled(self.model_id)
        if entry is not None and entry.default_size:  # FluxPipeline's class default is 1024 px
            return entry.default_size
        pipe = self.pipe
        scale = getattr(pipe, "vae_scale_factor", 8)
        unet = getattr(pipe, "unet", None)
        if unet is not None:
            size = unet.config.sample_size
            size = size if isinstance(size, int) else size[0]
            return size * scale, size * scale
        sample = getattr(pipe, "default_sample_size", 64)
        return sample * scale, sample * scale

    def build_plan(self, request: Request) -> DiffusionPlan:
        plan = self.base_plan(request)
        default_h, default_w = self.default_size()
        plan.kwargs["height"] = int(request.params.get("height") or default_h)
        plan.kwargs["width"] = int(request.params.get("width") or default_w)
        plan.kwargs["output_type"] = "pil"
        self.plan_img2img(request, plan)
        return plan

    def plan_img2img(self, request: Request, plan: DiffusionPlan) -> None:
        """An init image makes the run img2img: checked here, before anything runs (no
        image with a strength, a wrong size, a strength that runs no step: one line each).
        ``plan.img2img`` holds the image; ``generate`` encodes it inside the timed run."""
        from backends.img2img import DEFAULT_STRENGTH, denoising_steps, image_from_data_url

        params = request.params
        if params.get("init_image") is None:
            if params.get("strength") is not None:
                raise ValidationError("strength applies to img2img: give an init image too")
            return
        image = image_from_data_url(params["init_image"], (plan.kwargs["height"], plan.kwargs["width"]))
        strength = float(params["strength"] if params.get("strength") is not None else DEFAULT_STRENGTH)
        plan.extra["img2img_steps"] = denoising_steps(plan.steps, strength)
        plan.img2img = {"image": image, "strength": strength}

    def generate(self, plan: DiffusionPlan, timer: StageTimer, progress: ProgressFn | None) -> Any:
        if plan.img2img is None:
            return super().generate(plan, timer, progress)
        from backends.img2img import encode_images, img2img_pipeline

        pipe = img2img_pipeline(self.pipe)  # built now: a sampler attached to this run has set the scheduler
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        accepted = set(inspect.signature(type(pipe).__call__).parameters)
        height, width = plan.kwargs["height"], plan.kwargs["width"]
        kwargs = {k: v for k, v in self.pipeline_kwargs(plan, progress).items() if k in accepted}
        with self._timed_stages(timer), tracking_branches(self.denoiser, plan.guidance):
            latents = encode_images(self.pipe, [plan.img2img["image"]], height, width)
            output = pipe(**kwargs, image=latents, strength=plan.img2img["strength"])
        timer.seconds["denoise"] = max(
            0.0, timer.seconds["total_pipe"] - timer.seconds.get("encode", 0.0) - timer.seconds.get("decode", 0.0)
        )
        del timer.seconds["total_pipe"]
        return self.extract_output(output)

    def extract_output(self, output: Any) -> Any:
        return output.images[0]
