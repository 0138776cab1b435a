"""Approximate caching from history ("Approximate Caching for Efficiently Serving Diffusion
Models", the Nirvana system; Agarwal et al., NSDI 2024, seed 408: -19.8% end-to-end latency):
start a new prompt from an earlier, similar prompt's intermediate latent.

Prompts sent to one model repeat and nearly repeat. The early denoising steps fix the
layout and the colours; a similar earlier prompt went through nearly the same states. So
a finished run keeps its latents at a few steps (K = 10%, 20% ... 50% of its steps, the
paper's K in {5, 10, 15, 20, 25} of 50); a new run embeds its prompt with the model's own
text encoder, retrieves the most similar earlier prompt of exactly the same settings (model,
size, scheduler and its config, step count, guidance, negative prompt, dtype), and when the
similarity clears ``min_similarity`` it starts from that run's latent at step K and skips
the first K steps: the more similar the prompt, the larger K (the paper's choice of K by
similarity).

Similarity: each prompt is the sequence of its token states from the text encoder the
pipeline conditions on (``text_encoder``); each token is matched to its most similar
(cosine) token of the other prompt, as in BERTScore, and the score is the larger of the two
directions' mean match: how far one prompt contains the other. Measured on the bundled
models' encoders: a near-repeat with one extra word scores 0.994-1.0, a changed colour,
shape, position or background 0.79-0.96; a pooled vector (0.998 for "a red circle" against
"a red square") or BERTScore's F1 (0.91 for the near-repeat, 0.95 for the shape change)
could not tell them apart. Hence the paper's threshold idea with our own number, 0.97.

Seams (image pipelines with a ``prepare_latents``: Stable Diffusion, FLUX and kin):
``prepare_latents`` still draws the run's noise (the generator advances as in the
baseline) and its result is replaced by the cached latent; ``scheduler.set_timesteps``
drops the first K timesteps and the begin index starts at K, as diffusers' img2img does;
a step-end callback copies the latents at the kept steps for the studio to store. Where
the run's stored latents go and where earlier ones come from is the studio's business
(``studio/latent_cache.py``): it hands the candidates over as this method's records
(``MethodChoice.calibrations``, kind ``"latents"``), and picks the captured latents up from
``Result.extra`` only once the run has finished and been kept; a failed or cancelled run
stores nothing. The bundled video and audio pipelines draw their noise inline and index
their sigmas by the loop counter: no seam there, so the method is for images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any, Sequence

import numpy as np
import torch

from backends.accel._eval_cost import EvalCostMeter
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.accel._patch import patch_attr
from backends.types import ValidationError

log = logging.getLogger(__name__)

RECORD_KIND = "latents"  # the kind of the records the studio hands over
EXTRA_KEY = "approx_cache_latents"  # where the run leaves what the studio stores
SKIP_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5)  # the paper's K in {5, 10, 15, 20, 25} of 50 steps


class ApproxCacheConfig(MethodConfig):
    min_similarity: float = param(0.97, min=0.0, max=1.0, step=0.01,
                                  help="similarity (token-embedding match from the model's text encoder) an "
                                       "earlier prompt needs for its latent to be reused; lower = more reuse, "
                                       "rougher (the bundled encoders score one changed attribute 0.79-0.96)")
    max_skip: float = param(0.5, min=0.1, max=0.5, step=0.1,
                            help="share of the steps skipped for an exact repeat; less similar prompts skip "
                                 "less, down to 10% at min_similarity (paper: K up to 25 of 50 steps)")
    store: bool = param(True, help="keep this run's latents for later runs (off: only reuse)")


# -- prompt embedding and similarity ------------------------------------------------------
def prompt_embedding(pipe: Any, prompt: str) -> np.ndarray:
    """The prompt's token states from the pipeline's own (first) text encoder, each of unit
    length, as float16 (what the history keeps)."""
    tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or encoder is None:
        raise ValidationError("approx_cache needs a model with a text encoder to compare prompts")
    ids = tokenizer(prompt or "", truncation=True, max_length=getattr(tokenizer, "model_max_length", 77),
                    return_tensors="pt").input_ids
    device = next(encoder.parameters()).device
    with torch.no_grad():
        states = encoder(ids.to(device))[0][0].float()
    return torch.nn.functional.normalize(states, dim=-1).cpu().numpy().astype(np.float16)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """How far one prompt contains the other, token by token: each token state is matched
    to its most similar (cosine) token of the other prompt (BERTScore), and the larger of
    the two directions' mean match (recall or precision) is the score. 1.0 for the same
    prompt; close to 1 when one prompt only adds a word ("at the top left"); a changed
    colour, shape or position leaves a token without its match and scores lower."""
    cos = a.astype(np.float32) @ b.astype(np.float32).T
    return float(max(cos.max(axis=1).mean(), cos.max(axis=0).mean()))


# -- what must match exactly ----------------------------------------------------------------
def trajectory_settings(backend: Any, plan: DiffusionPlan) -> dict[str, Any]:
    """Everything besides the prompt that shapes the trajectory: a latent is reused only
    between runs that agree on all of it."""
    kwargs, scheduler = plan.kwargs, backend.pipe.scheduler
    scheduler_config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
    guidance = {k: kwargs[k] for k in ("guidance_scale", "true_cfg_scale") if k in kwargs}
    return {
        "model": backend.model_id,
        "height": kwargs.get("height"), "width": kwargs.get("width"), "frames": kwargs.get("num_frames"),
        "steps": int(plan.steps),
        "scheduler": type(scheduler).__name__,
        "scheduler_config": hashlib.sha1(scheduler_config.encode()).hexdigest()[:16],
        "guidance": {k: float(v) for k, v in guidance.items()}, "passes": int(plan.guidance.passes),
        "negative_prompt": kwargs.get("negative_prompt") or "",
        "dtype": str(backend.dtype),
        # every other method of the run shapes its latents too (a multi-resolution stage, a
        # cache's reuse): a latent is reused only under the same methods and parameters
        "methods": sorted(json.dumps([name, params], sort_keys=True, default=str)
                          for name, params in plan.methods if name != "approx_cache"),
    }


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def kept_steps(steps: int) -> list[int]:
    """The steps whose latents a run keeps: K = 10% ... 50% of its steps, at least one
    step and at least one left to run."""
    return sorted({k for k in (max(1, round(f * steps)) for f in SKIP_LEVELS) if 0 < k < steps})


def skip_for(score: float, config: ApproxCacheConfig, steps: int, available: Sequence[int]) -> int:
    """K for a match of ``score``: from 10% of the steps at ``min_similarity`` up to
    ``max_skip`` at 1.0, on the paper's levels, and no more than a stored step allows."""
    span = max(1e-9, 1.0 - config.min_similarity)
    share = min(1.0, max(0.0, (score - config.min_similarity) / span))
    fraction = SKIP_LEVELS[0] + share * (config.max_skip - SKIP_LEVELS[0])
    target = int(fraction * steps + 0.05)  # float16 embeddings: an exact repeat scores 0.9999
    fitting = [k for k in available if k <= target]
    return max(fitting) if fitting else 0


def nearest(records: Sequence[dict[str, Any]], key: str, embedding: np.ndarray, config: ApproxCacheConfig,
            steps: int) -> tuple[dict | None, float, int]:
    """The stored run of the same settings to start from, its similarity and K: the largest
    K any of them allows, then the most similar (a run that itself started at step 12
    kept no latent before it, so an equally similar run that kept step 10 may serve a
    prompt whose similarity allows K = 11)."""
    best, best_rank = None, (-1, -1.0)
    for record in records:
        if record.get("kind") != RECORD_KIND or record.get("settings_key") != key:
            continue
        stored = record.get("embedding")
        if stored is None:
            continue
        score = similarity(embedding, np.asarray(stored))
        skip = skip_for(score, config, steps, record.get("steps") or []) if score >= config.min_similarity else 0
        if (skip, score) > best_rank:
            best, best_rank = record, (skip, score)
    return best, best_rank[1], max(0, best_rank[0])


def load_latent(path: str, step: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)[f"step_{step}"]


# -- the run ------------------------------------------------------------------------------
class LatentCapture:
    """Step-end callback: copies the latents after each kept step (the step count done so
    far is the loop index + 1 + the skipped steps)."""

    tensor_inputs = ("latents",)

    def __init__(self, keep: Sequence[int], offset: int):
        self.keep, self.offset = set(keep), offset
        self.latents: dict[int, torch.Tensor] = {}

    def __call__(self, pipe, step, timestep, tensors) -> dict[str, Any]:
        done = self.offset + step + 1
        if done in self.keep and "latents" in tensors:
            self.latents[done] = tensors["latents"].detach().to("cpu", copy=True).contiguous()
        return {}


def start_at(handle: RunHandle, pipe: Any, latent: torch.Tensor, skip: int) -> None:
    """Make the pipeline start from ``latent`` at step ``skip``: its noise is still drawn
    and then replaced; the scheduler's timesteps lose their first ``skip`` entries and its
    begin index is ``skip`` (FLUX-style pipelines set it to 0 themselves: raised by skip)."""
    scheduler = pipe.scheduler
    order = int(getattr(scheduler, "order", 1))
    prepare, set_timesteps = pipe.prepare_latents, scheduler.set_timesteps

    @functools.wraps(prepare)
    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        drawn = prepare(*args, **kwargs)
        noise = drawn[0] if isinstance(drawn, tuple) else drawn
        if tuple(noise.shape) != tuple(latent.shape):
            raise ValidationError("approx_cache: the stored latent does not fit this run")  # settings guard this
        cached = latent.to(noise.device, noise.dtype)
        return (cached, *drawn[1:]) if isinstance(drawn, tuple) else cached

    @functools.wraps(set_timesteps)
    def skipping_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        out = set_timesteps(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps[skip * order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return out

    patch_attr(handle, pipe, "prepare_latents", prepare_latents)
    patch_attr(handle, scheduler, "set_timesteps", skipping_set_timesteps)
    if hasattr(scheduler, "set_begin_index"):
        set_begin_index = scheduler.set_begin_index

        @functools.wraps(set_begin_index)
        def shifted_begin_index(begin_index: int = 0) -> Any:
            return set_begin_index(begin_index + skip * order)

        patch_attr(handle, scheduler, "set_begin_index", shifted_begin_index)


@register
class ApproxCacheMethod(Method):
    spec = MethodSpec(
        name="approx_cache",
        title="Approximate caching from history (Nirvana)",
        modalities=("image",),
        families=("unet", "dit"),
        summary="Start from the intermediate latent of the most similar earlier prompt (same model, size, "
                "scheduler, steps and guidance) and skip its first K steps; K grows with the similarity.",
        paper="Approximate Caching for Efficiently Serving Diffusion Models (Nirvana; Agarwal et al., NSDI 2024; "
              "seed 408: -19.8% end-to-end latency)",
        lossless=False,
        config=ApproxCacheConfig,
        slots=("start-latent",),
        defaults_note="the paper's K levels (10-50% of the steps, K growing with similarity) and a similarity "
                      "threshold measured on the bundled models' text encoders (the paper sets its own for CLIP)",
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        pipe = backend.pipe
        if not callable(getattr(pipe, "prepare_latents", None)):
            raise ValidationError("approx_cache needs a pipeline that prepares its latents in one place "
                                  "(Stable Diffusion, FLUX and kin)")
        if getattr(plan, "img2img", None):
            raise ValidationError("approx_cache starts from an earlier run's noise; an img2img run starts from "
                                  "its image: turn one of them off")
        settings = trajectory_settings(backend, plan)
        key = settings_key(settings)
        embedding = prompt_embedding(pipe, plan.kwargs.get("prompt", ""))
        found = self.find(key, embedding, plan.steps)
        skip = found["skip"]
        keep = [k for k in kept_steps(plan.steps) if k >= skip] if self.config.store else []
        capture = LatentCapture(keep, skip)
        meter = EvalCostMeter(backend.denoiser) if skip else None
        passes = 1 if plan.guidance.batched else plan.guidance.passes
        handle = RunHandle(plan, lambda: self.run_stats(found, meter, skip * passes), lambda _plan: found["notes"])
        with handle.undo_on_error():
            if meter is not None:
                handle.on_remove(meter.remove)
                capture.latents[skip] = found["latent"].detach().to("cpu").contiguous()
                start_at(handle, pipe, found["latent"], skip)
            if keep:
                plan.callbacks.append(capture)
                plan.extra[EXTRA_KEY] = {"settings": settings, "settings_key": key, "embedding": embedding,
                                         "latents": capture.latents}
        found.pop("latent", None)  # the handle's stats outlive the run: keep no tensor there
        return handle

    def find(self, key: str, embedding: np.ndarray, steps: int) -> dict[str, Any]:
        """The reuse decision: the nearest stored run, its similarity, K, the latent."""
        found: dict[str, Any] = {"skip": 0, "similarity": None, "source_run": None, "notes": []}
        record, score, skip = nearest(self.calibrations, key, embedding, self.config, steps)
        if record is None:
            return found
        found["similarity"] = round(score, 4)
        if skip == 0:
            return found
        try:
            latent = load_latent(str(record["path"]), skip)
        except Exception as exc:  # deleted, truncated, not a latent file: a full run, one line said
            log.warning("approx_cache: stored latent of run %s unreadable (%s); full run", record.get("run_id"),
                        type(exc).__name__)
            found["notes"] = ["approx_cache: the stored latent of the matching earlier run is missing or "
                              "unreadable; this run ran every step"]
            return found
        found.update(skip=skip, source_run=record.get("run_id"), latent=latent)
        return found

    @staticmethod
    def run_stats(found: dict[str, Any], meter: EvalCostMeter | None, skipped_calls: int) -> dict[str, Any]:
        """Reuse or not, the similarity and K; on a reuse, the cost meter's figures with the
        skipped calls filed as partial calls that cost nothing (they never ran), so the
        ideal speedup is (run + skipped) / run calls, weighed by their measured cost."""
        stats = {"reused": bool(found["skip"]), "similarity": found["similarity"],
                 "skipped_steps": found["skip"], "source_run": found["source_run"]}
        if meter is None:
            return stats
        costs = meter.stats()
        full = costs["evals_full"]
        ideal = (full + skipped_calls) / full if full else None
        return {**stats, "evals_full": full, "evals_partial": skipped_calls, "full_eval_s": costs["full_eval_s"],
                "partial_eval_s": 0.0, "full_eval_ms": costs["full_eval_ms"], "partial_eval_ms": 0.0,
                "ideal_speedup": None if ideal is None else round(ideal, 4)}
