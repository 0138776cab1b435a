"""Input-adaptive FFN skipping (Jaiswal et al. 2024, "FFN-SkipLLM: A Hidden Gem for
Autoregressive Decoding with Adaptive Feed Forward Skipping"). Lossy.

The paper's observation: in the middle layers of a decoder the hidden state barely turns
inside the feed-forward (MLP) sublayer (the cosine similarity of the residual stream
before and after it is close to 1), and once a layer's FFN is "saturated" for a sequence
it stays so for the following tokens (their "monotonic" observation). Skipping those
MLPs (the residual passes through unchanged) saves a quarter of the FFN work with no KV
cache to patch, unlike early exit or layer dropping: attention still runs in every layer.

How the layers are chosen (``mode``):

``ffn`` (the paper's rule)
    During the warm-up (the prompt's forward and the first ``warmup_tokens`` decoded
    tokens, all computed in full) each candidate layer's FFN input/output similarity
    ``cos(h, h + FFN(h))`` is measured; after the warm-up the ``skip_fraction`` of all
    layers whose mean similarity is highest have their MLP skipped for the rest of the run.
``attention`` (per token)
    Every decoded token decides for itself from the similarity of the residual stream
    before and after each layer's *attention* sublayer, which is known before its MLP
    runs: a layer whose attention barely turned this token's hidden state skips its MLP
    when that similarity is over a threshold set at the end of the warm-up so that about
    ``skip_fraction`` of the layers would be skipped, at most that many per token.

The first ``protect_first`` and last ``protect_last`` layers are never skipped (the paper:
skipping early or last FFN blocks collapses generation). Forwards of more than one token
(the prompt) always run in full.

Reversible: the MLPs' ``forward`` is shadowed (``ForwardPatch``) and forward pre-hooks on the
candidate layers read the residual stream (in ``ffn`` mode only until the layers are chosen:
on a model this small a hook costs about what an MLP does); ``remove`` deletes them, so a run without the method
is bit-identical to plain decoding. Runs through ``generate`` (greedy or sampled); it
takes the ``decoder`` slot, because methods that verify several tokens per forward would
run this model's full path there and mix two models in one output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from backends.accel._decoding import DecodingHandle
from backends.accel._patch import ForwardPatch
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DecodingPlan
from backends.types import ValidationError

MODES = ("ffn", "attention")


@dataclass
class FFNSkipState:
    """One run's figures and decisions (reset per run: the handle owns a fresh one)."""

    layers: int
    candidates: list[int]
    budget: int  # layers skipped per decoded token at most
    warmup_tokens: int
    mode: str
    decode_steps: int = 0
    full: bool = True  # this forward runs every MLP (prompt, warm-up)
    skipping_this_token: int = 0
    mlp_calls: int = 0
    mlp_skipped: int = 0
    skipped_per_layer: dict[int, int] = field(default_factory=dict)
    # warm-up similarities per candidate layer (the ffn mode's FFN in/out, the attention mode's attention in/out)
    similarity: dict[int, list[float]] = field(default_factory=dict)
    fixed_layers: list[int] | None = None  # ffn mode: chosen at the end of the warm-up
    threshold: float | None = None  # attention mode: set at the end of the warm-up
    layer_input: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    # the hooks that read the residual stream: the ffn mode drops them once its layers are chosen
    stash_hooks: list[Any] = field(default_factory=list)

    def start_forward(self, tokens: int) -> None:
        """Called before each forward of the model: is this one computed in full?"""
        self.skipping_this_token = 0
        if tokens > 1:
            self.full = True
            return
        self.decode_steps += 1
        self.full = self.decode_steps <= self.warmup_tokens
        if not self.full and self.fixed_layers is None and self.threshold is None:
            self.decide()

    def decide(self) -> None:
        """End of the warm-up: fix the skipped layers (ffn) or the similarity threshold (attention)."""
        if self.budget == 0:
            self.fixed_layers, self.threshold = [], float("inf")
            return
        if self.mode == "ffn":
            means = {i: sum(v) / len(v) for i, v in self.similarity.items() if v}
            ranked = sorted(means, key=lambda i: (-means[i], i))
            self.fixed_layers = sorted(ranked[: self.budget])
            for hook in self.stash_hooks:  # nothing more to measure: every later token skips the same layers
                hook.remove()
            self.layer_input.clear()
            self.residual.clear()
            return
        values = torch.tensor([s for v in self.similarity.values() for s in v], dtype=torch.float64)
        share = self.budget / len(self.candidates)  # about budget of the candidates skipped per token
        self.threshold = float(torch.quantile(values, 1.0 - share)) if values.numel() else float("inf")

    def record(self, layer: int, value: torch.Tensor) -> None:
        if self.full and layer in self.candidates:
            self.similarity.setdefault(layer, []).extend(value.reshape(-1).tolist())

    def skip(self, layer: int) -> bool:
        """Skip this layer's MLP for the token now being decoded?"""
        if self.full or layer not in self.candidates:
            return False
        if self.mode == "ffn":
            return layer in (self.fixed_layers or ())
        if self.skipping_this_token >= self.budget:
            return False
        before, after = self.layer_input.get(layer), self.residual.get(layer)
        if before is None or after is None:
            return False
        return float(_cosine(before, after).mean()) >= self.threshold


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of two (batch, tokens, hidden) tensors, in float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def llama_layers(model: Any) -> Any:
    """The decoder layers, each with ``mlp`` and ``post_attention_layernorm`` (Llama layout)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer, "post_attention_layernorm")
                                 for layer in layers):
        raise ValidationError("FFN skipping needs a Llama-style decoder (model.layers[i].mlp and "
                              "post_attention_layernorm)")
    return layers


def skip_budget(layers: int, fraction: float, protect_first: int, protect_last: int) -> tuple[list[int], int]:
    """Candidate layers and how many of them are skipped per token; one-line errors for settings
    that leave nothing to skip."""
    if protect_first + protect_last >= layers:
        raise ValidationError(f"ffn_skip protects {protect_first} first + {protect_last} last layers, but the model "
                              f"has only {layers}: nothing could be skipped")
    candidates = list(range(protect_first, layers - protect_last))
    budget = min(len(candidates), round(fraction * layers))
    if fraction > 0 and budget == 0:
        raise ValidationError(f"ffn_skip: a skip fraction of {fraction} skips no layer of {layers}")
    return candidates, budget


def _token_count(args: tuple, kwargs: dict) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        return int(ids.shape[1]) if ids is not None else 1
    return int(ids.shape[-1])


def patch_model(model: Any, state: FFNSkipState, handle: DecodingHandle) -> None:
    """Hooks that read the residual stream, and MLP forwards that skip when ``state`` says so."""
    layers = llama_layers(model)

    def on_forward(_module, args, kwargs):
        state.start_forward(_token_count(args, kwargs))

    handle.on_remove(model.register_forward_pre_hook(on_forward, with_kwargs=True).remove)
    for i in state.candidates:  # only the layers that may skip read the residual stream
        layer = layers[i]
        hooks = [layer.post_attention_layernorm.register_forward_pre_hook(_stash(state.residual, i), with_kwargs=True)]
        if state.mode == "attention":
            hooks.append(layer.register_forward_pre_hook(_stash(state.layer_input, i), with_kwargs=True))
        for hook in hooks:
            state.stash_hooks.append(hook)
            handle.on_remove(hook.remove)  # removing a hook twice is harmless
    for i, layer in enumerate(layers):
        handle.on_remove(ForwardPatch(layer.mlp, _skipping_forward(state, i)).remove)


def _stash(store: dict[int, torch.Tensor], index: int):
    def hook(_module, args, kwargs):
        store[index] = args[0] if args else kwargs["hidden_states"]

    return hook


def _skipping_forward(state: FFNSkipState, index: int):
    def make(original):
        def forward(x, *args, **kwargs):
            state.mlp_calls += 1
            if state.skip(index):
                state.mlp_skipped += 1
                state.skipping_this_token += 1
                state.skipped_per_layer[index] = state.skipped_per_layer.get(index, 0) + 1
                return torch.zeros_like(x)  # the decoder layer adds it to the residual: h passes through
            out = original(x, *args, **kwargs)
            if state.full and index in state.candidates:
                residual = state.residual.get(index)
                if state.mode == "ffn" and residual is not None:
                    state.record(index, _cosine(residual, residual + out))
                elif state.mode == "attention" and residual is not None and index in state.layer_input:
                    state.record(index, _cosine(state.layer_input[index], residual))
            return out

        return forward

    return make


class FFNSkipConfig(MethodConfig):
    skip_fraction: float = param(0.25, min=0.0, max=0.75, step=0.05,
                                 help="share of all layers whose MLP is skipped per decoded token (paper: 25-30%)")
    protect_first: int = param(2, min=0, max=64, help="first layers never skipped (the paper never skips early FFNs)")
    protect_last: int = param(2, min=0, max=64, help="last layers never skipped")
    warmup_tokens: int = param(4, min=0, max=256, help="first decoded tokens computed in full (the prompt always "
                                                       "is); their similarities choose what is skipped")
    mode: str = param("ffn", choices=MODES, help="ffn: skip the layers whose FFN input/output similarity was "
                                                 "highest in the warm-up (the paper's monotonic rule); attention: "
                                                 "each token skips the MLPs whose attention sublayer barely "
                                                 "changed its hidden state")


@register
class FFNSkipMethod(Method):
    acts_while_decoding = True  # perplexity by teacher-forced decoding (backends/text_eval.py)
    spec = MethodSpec(
        name="ffn_skip",
        title="FFN skipping (FFN-SkipLLM)",
        modalities=("text",),
        families=("causal-lm",),
        summary="Skip, input-adaptively, the MLP of about a quarter of the layers (saturated middle layers, "
                "never the first or last) while decoding; attention and the KV cache stay whole.",
        paper="Jaiswal et al. 2024, FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with Adaptive "
              "Feed Forward Skipping (EMNLP)",
        lossless=False,
        config=FFNSkipConfig,
        slots=("decoder",),
        defaults_note="2 protected layers at each end and 4 warm-up tokens: the bundled model has 12 layers, "
                      "so a quarter (3) are skipped out of the 8 middle ones",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """For the search: each protected end at most half the other layers, so one is left
        to skip; a fraction that skips at least one layer of this depth."""
        layers = len(llama_layers(backend.model))
        each = max(0, (layers - 1) // 2)
        grid = cls.spec.param("skip_fraction")
        steps = round((grid.max - grid.min) / grid.step)
        fractions = [round(grid.min + i * grid.step, 6) for i in range(steps + 1)]
        least = next((f for f in fractions if round(f * layers) >= 1), grid.max)
        return Limits(search_ranges={"protect_first": (None, each), "protect_last": (None, each),
                                     "skip_fraction": (least, None)})

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        c = self.config
        layers = llama_layers(backend.model)
        candidates, budget = skip_budget(len(layers), c.skip_fraction, c.protect_first, c.protect_last)
        state = FFNSkipState(len(layers), candidates, budget, c.warmup_tokens, c.mode)
        handle = DecodingHandle(plan, lambda: self.run_stats(state), self.notes)
        with handle.undo_on_error():
            patch_model(backend.model, state, handle)
        return handle

    def run_stats(self, state: FFNSkipState) -> dict[str, Any]:
        return {
            "mlp_calls": state.mlp_calls,
            "mlp_skipped": state.mlp_skipped,
            "mlp_skipped_fraction": round(state.mlp_skipped / state.mlp_calls, 4) if state.mlp_calls else 0.0,
            "skipped_per_layer": {str(k): v for k, v in sorted(state.skipped_per_layer.items())},
            "skipped_layers": state.fixed_layers if state.mode == "ffn" else None,
            "similarity_threshold": round(state.threshold, 5) if state.threshold not in (None, float("inf")) else None,
            "protected_layers": [i for i in range(state.layers) if i not in state.candidates],
        }

    def notes(self, plan: DecodingPlan) -> list[str]:
        if self.config.skip_fraction == 0:
            return ["skip fraction 0: every MLP runs, output equals plain decoding"]
        if plan.max_new_tokens <= self.config.warmup_tokens + 1:
            return [f"{plan.max_new_tokens} new tokens fit in the warm-up ({self.config.warmup_tokens}): "
                    "nothing is skipped"]
        return []
