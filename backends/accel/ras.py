"""RAS, region-adaptive sampling (Liu et al. 2025, "Region-Adaptive Sampling for Diffusion
Transformers"; seed 105: 2.36x SD3, 2.51x Lumina-Next).

A DiT takes any number of tokens, and from one step to the next the model's focus stays on
the same regions. RAS therefore runs the transformer, at most steps, on only the image
tokens of the regions in focus; every other token reuses its model output (the noise
estimate) from the step before. Which tokens: after each step the paper scores every token
by the standard deviation over channels of the latent's update (``(σ_next - σ) · output``,
the guided noise estimate as the scheduler applied it). Which end of that score is "in
focus" is ``focus``: ``high`` (default, the paper's description: the regions in focus are
those whose noise estimate deviates most) computes the tokens that deviate most, ``low`` the
least deviating ones, which is what the authors' released code does (``high_ratio=1``
serves the high-deviation tokens from the cache). We measured both at ``sample_ratio=0.25`` on
``tiny-video-shapes``: ``high`` was 1.2-1.9 dB closer to the baseline on three probe
prompts, 0.3 dB on the benchmark's six (``benchmarks/results/ras-tiny-video-shapes.json``,
where one prompt's adherence went the other way): close, so the paper's description decides.
A token dropped often has its
score moved toward being computed by ``exp(±starvation_scale · drops)`` (the paper's
starvation term; the authors' code multiplies by ``exp(+k · drops)`` whatever the end it
keeps). The first ``warmup_steps`` steps and a step every
``reset_every`` after them run in full (the paper's "error reset": steps 0-3, 12 and 20 of
28).

We read the update from the transformer's own input: the latent entering step s minus the
latent that entered step s-1 is exactly the scheduler's update with the guided estimate,
whatever the sampler, and both CFG branches see the same latent, so they pick the same
tokens without talking to each other.

Mechanics, per model class (the RoPE positions are sliced with the tokens):

- FLUX (``FluxTransformer2DModel``): the packed latent tokens and their ``img_ids`` enter
  the transformer sliced to the active tokens; the model computes the rotary embedding of
  exactly those positions itself.
- Wan (``WanTransformer3DModel``): the 5-D latent is patch-embedded inside the model, so
  the slice happens at the blocks: the first block gets the active tokens, every block the
  rotary rows of those tokens, and the last block's output is put back on the full grid.

Attention: the keys and values of the dropped tokens, as last computed (after RoPE), are
kept per attention layer and CFG branch, and every active query attends to them as well as
to the fresh keys of the active tokens (the paper's KV caching; ``cache_kv=False`` drops
them from attention). The swap is made by running each attention processor's own code with
``dispatch_attention_fn`` rebound (the way ``int8_attention`` does it), so projections,
norms and rotary embeddings stay diffusers' own.

Slot: the DiT caches (it answers tokens from cached outputs) and attention (it owns the
processors while attached).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.accel._eval_cost import EvalCostMeter
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


class RASConfig(MethodConfig):
    sample_ratio: float = param(0.5, min=0.05, max=1.0, step=0.05,
                                help="share of the image tokens computed fresh at a RAS step (paper's "
                                     "example scripts: 0.5); lower = faster and rougher")
    warmup_steps: int = param(4, min=0, max=100, help="first steps computed in full (paper: 4)")
    reset_every: int = param(8, min=0, max=100,
                             help="after the warm-up, a full step every N steps to reset the error "
                                  "(paper: steps 12 and 20 of 28, i.e. every 8 after 4); 0 = never")
    starvation_scale: float = param(0.1, min=0.0, max=10.0, step=0.05,
                                    help="how fast a token dropped many times gains priority (paper: 0.1)")
    focus: str = param("high", choices=("high", "low"),
                       help="which tokens are in focus: the highest deviation of the last update (the "
                            "paper's description) or the lowest (what the authors' released code selects); "
                            "within 0.3 dB of each other on tiny-video-shapes")
    cache_kv: bool = param(True, help="dropped tokens keep their last keys/values in attention (paper); off: "
                                      "active tokens attend only to each other and the text")


def is_full_step(step: int, config: RASConfig) -> bool:
    if step < max(config.warmup_steps, 1):  # step 0 has no update to score
        return True
    return config.reset_every > 0 and step > config.warmup_steps and \
        (step - config.warmup_steps) % config.reset_every == 0


# ----------------------------------------------------------------------------- token views


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, F, H, W]`` -> ``[B, N, C*pt*ph*pw]`` in the order Wan flattens its patches."""
    b, c, f, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pt) * (h // ph) * (w // pw), -1)


def unpatchify(tokens: torch.Tensor, shape: torch.Size, patch: tuple[int, int, int]) -> torch.Tensor:
    b, c, f, h, w = shape
    pt, ph, pw = patch
    x = tokens.reshape(b, f // pt, h // ph, w // pw, c, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(shape)


@dataclass
class Branch:
    """One CFG branch's cache: the last input and full output (as tokens), drop counts, the
    image keys/values of each attention layer, and the tokens the call now running computes."""

    calls: int = 0
    previous_input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    drops: torch.Tensor | None = None
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    active: torch.Tensor | None = None  # None: the call computes every token


@dataclass
class RASRun:
    """What the hooks of one run share."""

    config: RASConfig
    branches: dict[str, Branch] = field(default_factory=dict)
    current: Branch | None = None
    tokens: int = 0  # image tokens of the call now running
    ras_calls: int = 0
    full_calls: int = 0
    token_evals: int = 0  # image tokens sent through the blocks, over all calls
    dense_token_evals: int = 0
    kv_reused: int = 0  # attention calls that saw cached keys/values of dropped tokens


def select_tokens(update: torch.Tensor, drops: torch.Tensor, config: RASConfig) -> torch.Tensor:
    """Indices (sorted) of the tokens in focus: the highest (``focus="high"``) or lowest
    std-over-channels of the update, each score moved toward "in focus" by
    ``exp(±k * drops)`` so long-dropped tokens come back."""
    high = config.focus == "high"
    score = update.float().std(dim=-1).mean(dim=0)  # [N], averaged over the batch
    score = score * torch.exp((1 if high else -1) * config.starvation_scale * drops)
    keep = max(1, round(config.sample_ratio * score.numel()))
    return torch.sort(torch.argsort(score, descending=high)[:keep]).values


class _Adapter:
    """How one model class shows its image tokens: ``input_tokens`` / ``output_tokens`` /
    ``with_output`` (the full-size result), and ``slice_call`` (make the call run on the
    active tokens; returns the new args/kwargs)."""

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser

    def hooks(self, run: RASRun) -> list[Any]:
        return []


class _FluxAdapter(_Adapter):
    @staticmethod
    def _latent(args, kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def input_tokens(self, args, kwargs):
        return self._latent(args, kwargs)

    def slice_call(self, args, kwargs, active):
        kwargs = dict(kwargs)
        if "hidden_states" not in kwargs:
            kwargs["hidden_states"], args = args[0], args[1:]
        kwargs["hidden_states"] = kwargs["hidden_states"][:, active]
        ids = kwargs.get("img_ids")
        if ids is None:
            raise ValidationError("ras needs the FLUX call's img_ids (the image token positions)")
        kwargs["img_ids"] = ids[..., active, :]  # [N, 3] or the deprecated [B, N, 3]
        return args, kwargs

    def output_tokens(self, output):
        return _sample(output)

    def with_output(self, output, tokens):
        return _replace_sample(output, tokens)

    def computed_tokens(self, out_tokens, active):
        return out_tokens  # the model ran on the active tokens only


class _WanAdapter(_Adapter):
    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.patch = tuple(int(p) for p in denoiser.config.patch_size)

    def input_tokens(self, args, kwargs):
        latent = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return patchify(latent, self.patch)

    def slice_call(self, args, kwargs, active):
        return args, kwargs  # the blocks' hooks slice

    def output_tokens(self, output):
        return patchify(_sample(output), self.patch)

    def with_output(self, output, tokens):
        return _replace_sample(output, unpatchify(tokens, _sample(output).shape, self.patch))

    def computed_tokens(self, out_tokens, active):
        return out_tokens[:, active]

    def hooks(self, run: RASRun) -> list[Any]:
        blocks = list(self.denoiser.blocks)

        def slice_block(module, args):
            branch = run.current
            if branch is None or branch.active is None:
                return None
            active = branch.active
            hidden, text, temb, rotary = args[:4]
            if module is blocks[0]:
                hidden = hidden[:, active]
            if temb.ndim == 4:  # a per-token timestep (Wan 2.2 TI2V)
                temb = temb[:, active]
            rotary = tuple(r[:, active] for r in rotary)
            return (hidden, text, temb, rotary, *args[4:])

        def unslice_last(_module, _args, output):
            branch = run.current
            if branch is None or branch.active is None:
                return None
            full = output.new_zeros(output.shape[0], run.tokens, output.shape[-1])
            full[:, branch.active] = output
            return full  # the dropped tokens' rows are replaced by their cached outputs afterwards

        handles = [block.register_forward_pre_hook(slice_block) for block in blocks]
        handles.append(blocks[-1].register_forward_hook(unslice_last))
        return handles


def _sample(output):
    if isinstance(output, tuple):
        return output[0]
    return output.sample if hasattr(output, "sample") else output


def _replace_sample(output, sample):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if hasattr(output, "sample"):
        output.sample = sample
        return output
    return sample


def adapter_for(denoiser: torch.nn.Module) -> _Adapter:
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    if isinstance(denoiser, FluxTransformer2DModel):
        return _FluxAdapter(denoiser)
    if isinstance(denoiser, WanTransformer3DModel):
        return _WanAdapter(denoiser)
    raise ValidationError(f"ras supports FLUX and Wan transformers, not {type(denoiser).__name__}")


def self_attention_modules(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention layers whose keys include the image tokens (FLUX: all; Wan: ``attn1``)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention
    from diffusers.models.transformers.transformer_wan import WanAttention

    return [m for m in denoiser.modules()
            if isinstance(m, FluxAttention) or isinstance(m, WanAttention) and not m.is_cross_attention]


class RASAttnProcessor:
    """The original processor's own ``__call__`` with ``dispatch_attention_fn`` rebound:
    on a full call it records the image tokens' keys/values (the trailing tokens of the
    sequence); on a RAS call it writes the fresh ones into that record and lets the
    queries attend to the whole record."""

    def __init__(self, original: Any, run: RASRun):
        from backends.accel.int8_attention import rebindable

        if rebindable(original) != "dispatch":
            raise ValidationError("ras cannot run with another method that replaced the attention processors")
        self.original, self.run = original, run
        call = type(original).__call__
        scope = dict(call.__globals__)
        self._dispatch = scope["dispatch_attention_fn"]
        scope["dispatch_attention_fn"] = self.dispatch
        self._call = types.FunctionType(call.__code__, scope, call.__name__, call.__defaults__)
        self._call.__kwdefaults__ = call.__kwdefaults__

    def __getattr__(self, name: str) -> Any:  # _attention_backend, _parallel_config, ...
        original = self.__dict__.get("original")
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.original, *args, **kwargs)

    def dispatch(self, query, key, value, attn_mask=None, *args, **kwargs):
        branch, run = self.run.current, self.run
        if branch is None or attn_mask is not None or not run.config.cache_kv:
            return self._dispatch(query, key, value, attn_mask, *args, **kwargs)
        active = branch.active
        image = run.tokens if active is None else active.numel()
        prefix = key.shape[1] - image  # the text tokens FLUX puts first; 0 for Wan
        if active is None:
            branch.kv[id(self)] = (key[:, prefix:].detach(), value[:, prefix:].detach())
        else:
            cached = branch.kv.get(id(self))
            if cached is not None and cached[0].shape[0] == key.shape[0]:
                full_k, full_v = cached[0].clone(), cached[1].clone()
                full_k[:, active], full_v[:, active] = key[:, prefix:], value[:, prefix:]
                branch.kv[id(self)] = (full_k, full_v)
                key = torch.cat([key[:, :prefix], full_k], dim=1)
                value = torch.cat([value[:, :prefix], full_v], dim=1)
                run.kv_reused += 1
        return self._dispatch(query, key, value, attn_mask, *args, **kwargs)


class RASHooks:
    """The transformer-level hooks: score and choose the tokens before a call, run the call
    on them, put the full output (fresh rows + cached rows) together after it."""

    def __init__(self, denoiser, run: RASRun, guidance, meter: EvalCostMeter, handle: RunHandle | None = None):
        """With ``handle``, the hooks' removal is registered before the first one exists:
        a failure while adding the others still removes those already added."""
        self.adapter = adapter_for(denoiser)
        self.run, self.guidance, self.meter = run, guidance, meter
        self.handles: list[Any] = []
        if handle is not None:
            handle.on_remove(self.remove)
        self.handles.append(denoiser.register_forward_pre_hook(self.before, with_kwargs=True))
        self.handles.append(denoiser.register_forward_hook(self.after, with_kwargs=True))
        self.handles += self.adapter.hooks(run)

    def before(self, _module, args, kwargs):
        run = self.run
        branch = run.branches.setdefault(self.guidance.branch or "default", Branch())
        tokens = self.adapter.input_tokens(args, kwargs)
        step = branch.calls
        branch.calls += 1
        previous = branch.previous_input
        branch.previous_input = tokens.detach().clone()
        run.current, run.tokens = branch, tokens.shape[1]
        if branch.drops is None or branch.drops.numel() != tokens.shape[1]:
            branch.drops = torch.zeros(tokens.shape[1], device=tokens.device)
        usable = (previous is not None and previous.shape == tokens.shape and branch.output is not None
                  and branch.output.shape[:2] == tokens.shape[:2])
        if is_full_step(step, run.config) or not usable or run.config.sample_ratio >= 1.0:
            branch.active = None
            run.full_calls += 1
            run.token_evals += tokens.shape[1]
            run.dense_token_evals += tokens.shape[1]
            return None
        active = select_tokens(tokens - previous, branch.drops, run.config)
        dropped = torch.ones_like(branch.drops, dtype=torch.bool)
        dropped[active] = False
        branch.drops[dropped] += 1
        branch.active = active
        run.ras_calls += 1
        run.token_evals += active.numel()
        run.dense_token_evals += tokens.shape[1]
        self.meter.mark_partial()
        return self.adapter.slice_call(args, kwargs, active)

    def after(self, _module, _args, _kwargs, output):
        run, branch = self.run, self.run.current
        run.current = None
        if branch is None:
            return None
        out = self.adapter.output_tokens(output)
        active, branch.active = branch.active, None
        if active is None:  # a full call: keep our own copy (the pipeline owns ``out``)
            branch.output = out.detach().clone()
            return None
        full = branch.output.clone()
        full[:, active] = self.adapter.computed_tokens(out, active).to(full.dtype)
        branch.output = full.detach()
        return self.adapter.with_output(output, full.clone())  # ours stays ours

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@register
class RASMethod(Method):
    spec = MethodSpec(
        name="ras",
        title="RAS (region-adaptive sampling)",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="At most steps only the image tokens in focus (by the deviation of the last update) run "
                "through the transformer; the others reuse their last output, their keys/values stay "
                "in attention. Full steps at the start and periodically.",
        paper="Liu et al. 2025, Region-Adaptive Sampling for Diffusion Transformers (seed 105: 2.36x SD3, "
              "2.51x Lumina-Next)",
        lossless=False,
        config=RASConfig,
        slots=("dit-cache", "attention"),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        adapter_for(denoiser)  # refuse an unsupported model before patching anything
        run = RASRun(self.config)
        meter = EvalCostMeter(denoiser)
        handle = RunHandle(plan, lambda: self.run_stats(run, meter), self.notes)
        handle.on_remove(meter.remove)
        with handle.undo_on_error():
            for module in self_attention_modules(denoiser):
                processor = RASAttnProcessor(module.processor, run)
                handle.on_remove(module.set_processor, module.processor)
                module.set_processor(processor)
            RASHooks(denoiser, run, plan.guidance, meter, handle)
        return handle

    def run_stats(self, run: RASRun, meter: EvalCostMeter) -> dict[str, Any]:
        dense = run.dense_token_evals
        return {
            "ras_calls": run.ras_calls,
            "full_calls": run.full_calls,
            "token_evals": run.token_evals,
            "dense_token_evals": dense,
            "token_fraction": round(run.token_evals / dense, 4) if dense else 1.0,
            "kv_reused_calls": run.kv_reused,
            **meter.stats(),
        }

    def notes(self, plan: DiffusionPlan) -> list[str]:
        config = self.config
        if config.sample_ratio >= 1.0:
            return ["ras with sample_ratio 1 computes every token: no speed-up"]
        if not any(not is_full_step(s, config) for s in range(plan.steps)):
            return [f"ras: all {plan.steps} steps are full steps (warm-up {config.warmup_steps}), nothing is "
                    "sampled by region"]
        return []


def expected_token_fraction(steps: int, config: RASConfig) -> float:
    """The share of token evaluations a run of ``steps`` makes (for notes and the README)."""
    ras = sum(not is_full_step(s, config) for s in range(steps))
    return (steps - ras + ras * config.sample_ratio) / steps if steps else 1.0

