"""Self-speculative decoding by layer skipping (Zhang et al. 2024, "Draft & Verify: Lossless
Large Language Model Acceleration via Self-Speculative Decoding"; Xia et al. 2025, SWIFT;
Elhoushi et al. 2024, LayerSkip).

The model itself is the draft: with a set of intermediate decoder layers turned into the
identity it drafts ``draft_tokens`` tokens one by one, then the full model verifies them
in one forward and keeps the longest prefix that plain greedy decoding would produce, plus
its own next token. No second model, exact greedy output.

Skipping is reversible: ``apply`` shadows the ``forward`` of each chosen layer with one
that returns its input while the draft phase is on, and calls the real layer otherwise;
``remove`` deletes the shadow. The draft reads the full model's KV cache for the prefix
(an approximation of what the skipped model would have cached there: it only lowers
acceptance, never exactness) and its own entries are cropped again before verification.
The first and last layers are never skipped, so layer 0, from which transformers sizes
the attention mask and positions, always holds the full length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backends.accel._patch import ForwardPatch
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import (DecodeState, DecodingHandle, accept_greedy, crop_cache, require_greedy,
                                      set_decoder)
from backends.plan import DecodingPlan
from backends.types import ValidationError


@dataclass
class LayerSkipState:
    drafting: bool = False
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def reset(self) -> None:
        self.drafting, self.rounds, self.drafted, self.accepted = False, 0, 0, 0


def choose_layers(n_layers: int, ratio: float, skip_from: int = 0, skip_to: int = 0) -> list[int]:
    """Layers to skip: the explicit range ``skip_from..skip_to`` when ``skip_to`` is set,
    else ``ratio`` of all layers, taken from the inner ones and spread evenly."""
    inner = list(range(1, n_layers - 1))
    if skip_to:
        layers = list(range(max(1, skip_from), skip_to + 1))
        if not layers or layers[-1] > n_layers - 2:
            raise ValidationError(f"only inner layers 1..{n_layers - 2} can be skipped, got {skip_from}..{skip_to}")
        return layers
    count = min(len(inner), round(ratio * n_layers))
    if count <= 0:
        return []
    step = len(inner) / count
    return sorted({inner[int(i * step + step / 2)] for i in range(count)})


def decoder_layers(model: Any) -> Any:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValidationError("layer skipping needs a decoder-only model with model.layers (Llama/Qwen/Mistral layout)")
    return layers


def layer_skip_decode(backend, input_ids: torch.Tensor, state: DecodeState, skip_state: LayerSkipState,
                      draft_tokens: int, skipped: list[int], confidence: float = 0.0) -> None:
    from transformers import DynamicCache

    model = backend.model
    body, head = model.model, model.get_output_embeddings()
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    current = int(out.logits[0, -1].argmax())
    if state.emit([current]):
        return
    while True:
        past = cache.get_seq_length()
        k = max(1, min(draft_tokens, state.remaining - 1))
        # Draft: the body with skipped layers, straight to the head (not a counted target forward).
        drafts: list[int] = []
        token = current
        skip_state.drafting = True
        try:
            for _ in range(k):
                hidden = body(input_ids=torch.tensor([[token]], device=input_ids.device), past_key_values=cache,
                              use_cache=True).last_hidden_state
                logits = head(hidden[:, -1])[0]
                token = int(logits.argmax(-1))
                drafts.append(token)
                if token in state.eos_token_ids:
                    break
                if confidence > 0 and float(logits.float().softmax(-1).max()) < confidence:
                    break  # SWIFT-style early stop: an unsure draft is unlikely to be accepted
        finally:
            skip_state.drafting = False
        crop_cache(cache, past)  # drop the draft's entries (only kept layers wrote any) before verifying
        ids = torch.tensor([[current] + drafts], device=input_ids.device)
        greedy = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].argmax(-1).tolist()
        accepted = accept_greedy(drafts, greedy)
        skip_state.rounds += 1
        skip_state.drafted += len(drafts)
        skip_state.accepted += len(accepted) - 1
        crop_cache(cache, past + len(accepted))  # keep c and the accepted drafts
        if state.emit(accepted):
            return
        current = accepted[-1]


class LayerSkipConfig(MethodConfig):
    skip_ratio: float = param(0.5, min=0.0, max=0.9, step=0.05,
                              help="fraction of all layers skipped while drafting, spread over the inner layers")
    draft_tokens: int = param(4, min=1, max=16, help="most tokens drafted per verification forward")
    draft_confidence: float = param(0.0, min=0.0, max=1.0, step=0.05,
                                    help="stop a draft early when its top probability falls below this (0 = "
                                         "always draft_tokens)")
    skip_from: int = param(0, min=0, max=256, help="first layer of an explicit skipped range")
    skip_to: int = param(0, min=0, max=256, help="last layer of an explicit skipped range (0 = use skip_ratio "
                                                 "instead)")


@register
class LayerSkipMethod(Method):
    spec = MethodSpec(
        name="layer_skip",
        title="Self-speculative layer skipping",
        modalities=("text",),
        families=("causal-lm",),
        summary="The model with some layers skipped drafts tokens the full model verifies; exact greedy output.",
        paper="Zhang et al. 2024, Draft & Verify (ACL); Xia et al. 2025, SWIFT (ICLR); "
              "Elhoushi et al. 2024, LayerSkip (ACL)",
        lossless=True,
        config=LayerSkipConfig,
        slots=("decoder",),
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """An explicit range ends at an inner layer (skip_to=0: the ratio is used instead);
        for the search it also starts at or before its end."""
        inner_last = max(0, len(decoder_layers(backend.model)) - 2)
        return Limits(ranges={"skip_to": (None, inner_last)},
                      search_ranges={"skip_from": (None, inner_last), "skip_to": ("skip_from", None)})

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        require_greedy(plan, "layer skipping")
        layers = decoder_layers(backend.model)
        c = self.config
        skipped = choose_layers(len(layers), c.skip_ratio, c.skip_from, c.skip_to)
        s = LayerSkipState()

        def make_forward(original):
            def forward(hidden_states, *args, **kwargs):
                if s.drafting:
                    return hidden_states
                return original(hidden_states, *args, **kwargs)

            return forward

        set_decoder(plan, lambda b, ids, state: layer_skip_decode(b, ids, state, s, c.draft_tokens, skipped,
                                                                  c.draft_confidence), "layer skipping")
        notes = [] if skipped else ["no layer is skipped: the draft is the full model, which only adds work"]
        handle = DecodingHandle(plan, lambda: dict(
            skipped_layers=list(skipped), draft_rounds=s.rounds, drafted=s.drafted,
            acceptance_rate=round(s.accepted / s.drafted, 3) if s.drafted else 0.0), lambda _plan: notes)
        with handle.undo_on_error():
            for i in skipped:
                handle.on_remove(ForwardPatch(layers[i], make_forward).remove)
        return handle
