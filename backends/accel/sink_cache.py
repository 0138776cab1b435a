"""Attention sinks + recent window KV cache (Xiao et al. 2024, "Efficient Streaming Language
Models with Attention Sinks", StreamingLLM). Lossy.

The cache keeps the first ``num_sink_tokens`` tokens (the "attention sinks" that soak up
attention mass) and the last ``window_length`` tokens; everything in between is evicted.
Memory and per-token attention cost stay constant however long the text grows.

transformers 5 no longer ships ``SinkCache`` (it moved to a hub ``custom_generate`` repo in
4.5x, and there is no hub here), so this is our own loop over a ``DynamicCache``, evicting
after every forward. Positions follow StreamingLLM: a token's position is its index *in
the cache*, not in the text, so positions never exceed ``sinks + window`` and the model
never sees a distance longer than it was trained on. When ``e`` tokens are evicted, the
keys of the window are re-rotated by ``-e`` positions (RoPE is a rotation per frequency
pair, so ``R(p - e) = R(-e) R(p)``), exactly what the old transformers ``SinkCache`` did.
Assumes Llama-style ``rotate_half`` RoPE. As long as prompt + output fit in
``sinks + window`` nothing is evicted and the output equals plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodeState, DecodingHandle, set_decoder
from backends.plan import DecodingPlan
from backends.types import ValidationError


@dataclass
class SinkState:
    evictions: int = 0
    evicted_tokens: int = 0
    max_cache_len: int = 0

    def reset(self) -> None:
        self.evictions = self.evicted_tokens = self.max_cache_len = 0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def shift_positions(model: Any, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Re-rotate RoPE keys by ``delta`` positions."""
    rotary = model.model.rotary_emb
    position = torch.tensor([[delta]], device=keys.device)
    cos, sin = rotary(keys, position_ids=position)
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = (cos / scale)[:, None].to(keys.dtype), (sin / scale)[:, None].to(keys.dtype)
    return keys * cos + _rotate_half(keys) * sin


def evict(model: Any, cache: Any, sinks: int, window: int, stats: SinkState) -> None:
    length = cache.get_seq_length()
    stats.max_cache_len = max(stats.max_cache_len, length)
    extra = length - sinks - window
    if extra <= 0:
        return
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        recent = shift_positions(model, keys[..., sinks + extra:, :], -extra)
        layer.keys = torch.cat([keys[..., :sinks, :], recent], dim=-2)
        layer.values = torch.cat([values[..., :sinks, :], values[..., sinks + extra:, :]], dim=-2)
    stats.evictions += 1
    stats.evicted_tokens += extra


def sink_decode(backend, input_ids: torch.Tensor, state: DecodeState, sinks: int, window: int,
                stats: SinkState) -> None:
    from transformers import DynamicCache

    model = backend.model
    cache = DynamicCache(config=model.config)
    ids = input_ids
    while True:
        # positions default to the cache length: StreamingLLM's in-cache positions
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        evict(model, cache, sinks, window, stats)
        token = int(state.sampling.pick(logits))
        if state.emit([token]):
            return
        ids = torch.tensor([[token]], device=input_ids.device)


class SinkCacheConfig(MethodConfig):
    num_sink_tokens: int = param(4, min=0, max=64, help="first tokens always kept (paper: 4)")
    window_length: int = param(256, min=8, max=8192, help="most recent tokens kept")


@register
class SinkCacheMethod(Method):
    spec = MethodSpec(
        name="sink_cache",
        title="Attention sinks (StreamingLLM)",
        modalities=("text",),
        families=("causal-lm",),
        summary="Keep the first few tokens and a recent window in the KV cache; constant memory, lossy "
                "once the text outgrows the window.",
        paper="Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks (ICLR)",
        lossless=False,
        config=SinkCacheConfig,
        slots=("decoder",),
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        rotary = getattr(getattr(backend.model, "model", None), "rotary_emb", None)
        if rotary is None:
            raise ValidationError("the attention-sink cache needs a RoPE decoder (model.model.rotary_emb)")
        s, sinks, window = SinkState(), self.config.num_sink_tokens, self.config.window_length
        set_decoder(plan, lambda b, ids, state: sink_decode(b, ids, state, sinks, window, s),
                    "the attention-sink cache")
        return DecodingHandle(plan, lambda: dict(
            evicted_tokens=s.evicted_tokens, evictions=s.evictions, max_cache_len=s.max_cache_len,
            lossless_this_run=s.evicted_tokens == 0), self.notes)

    def notes(self, plan: DecodingPlan) -> list[str]:
        total = int(plan.input_ids.shape[-1]) + plan.max_new_tokens
        budget = self.config.num_sink_tokens + self.config.window_length
        if total <= budget:
            return [f"prompt + output ({total} tokens) fit in sinks + window ({budget}): nothing is evicted, "
                    "output equals plain decoding and nothing is saved"]
        return [f"up to {total - budget} tokens will be evicted from the cache: output may differ from plain decoding"]
