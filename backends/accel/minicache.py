"""Cross-layer KV cache merging (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth
Dimension for Large Language Models"). Lossy.

The paper's observation: from the middle of the depth on, the keys and values that adjacent
layers cache for one token point in nearly the same direction. MiniCache stores, for each
pair of adjacent layers (l, l+1) in the merged range and each token, one shared direction
(the SLERP of the two layers' normalised vectors at ``t``, 0.6 in the paper) plus each
layer's own magnitude, and rebuilds layer l's vector as ``magnitude_l * direction``. Tokens
whose two vectors are far apart (angular distance ``arccos(cos) / pi``, mean over heads) are
"retention" tokens: kept unmerged, exactly, for both layers. Which are far: the ``retention``
share of the prompt's tokens with the largest distance, per pair and for keys and values
apart; the distance that share sets on the prompt then judges each decoded token (the
paper sets the threshold relative to the spread of distances over the sequence; a token
decoded alone has no spread to compare with).

Here it is a transformers ``DynamicCache`` whose layers in the merged range are replaced by
``MergedLayer`` objects sharing one ``MergedPair`` store per pair, handed to ``generate``
the way ``kv_quant`` hands over its quantized cache. When does a token get merged: layer l
keeps a new token's K/V raw until layer l+1 has computed its own for the same token, then
both are merged. Every forward attends over the merged past plus its own new tokens exact,
so the prompt's forward (the first token) is exactly plain; later tokens read a merged past.

Stored per pair, per token: one direction (head_dim floats per head) and two magnitudes
(one float per head and layer) instead of two vectors; over the merged layers the cache is
``2 * head_dim / (head_dim + 2)`` times smaller (1.94x at head_dim 64) less what the
retention tokens keep; ``stats`` measures the tensors actually held. The paper's 5.02x is
MiniCache on top of 4-bit KV quantization; depth merging alone gives about 1.5x there too.

What it costs on CPU: every forward rebuilds the merged layers' K/V from direction and
magnitude (the memory is saved, not time). Takes the ``decoder`` slot (one cache per run).
Nothing on the model is patched: removal restores plain decoding trivially.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.accel._decoding import DecodingHandle
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DecodingPlan
from backends.types import ValidationError

EPS = 1e-8


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` over the last axis, in [0, 1] (0: same direction)."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=EPS)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def slerp_direction(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The unit vector ``t`` of the way from ``a``'s direction to ``b``'s along the great circle
    (SLERP of the normalised vectors; a plain normalised lerp where they are parallel)."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-4
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / sin.clamp_min(1e-4))
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / sin.clamp_min(1e-4))
    direction = wa * ua + wb * ub
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(EPS)


@dataclass
class MergedStates:
    """The keys (or values) of one layer pair. Merged tokens: one shared direction and the two
    layers' magnitudes; retention tokens: both layers' exact vectors. Each token is in one of
    the two, so a retained token costs what a plain cache would, a merged one about half."""

    direction: torch.Tensor | None = None  # (batch, heads, merged, head_dim)
    magnitude: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])  # (b, h, merged, 1) each
    merged_index: torch.Tensor | None = None  # (merged,) token positions
    retained_index: torch.Tensor | None = None  # (kept,) token positions
    retained: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])  # (b, h, kept, head_dim)
    threshold: float | None = None  # angular distance over which a token is retained
    tokens: int = 0

    def merge(self, first: torch.Tensor, second: torch.Tensor, t: float, retention: float) -> None:
        """Append new tokens of both layers (b, h, n, d). The first call (the prompt) sets the
        retention threshold: the distance that ``retention`` of its tokens exceed."""
        distance = angular_distance(first, second).mean(dim=(0, 1))  # per token, over batch and heads
        if self.threshold is None:
            self.threshold = retention_threshold(distance, retention)
        keep = distance > self.threshold
        positions = torch.arange(self.tokens, self.tokens + distance.numel(), device=first.device)
        merge, kept = torch.nonzero(~keep).reshape(-1), torch.nonzero(keep).reshape(-1)
        if merge.numel():
            a, b = first.index_select(-2, merge), second.index_select(-2, merge)
            self.direction = _cat(self.direction, slerp_direction(a, b, t).to(first.dtype))
            for i, states in enumerate((a, b)):
                self.magnitude[i] = _cat(self.magnitude[i], states.norm(dim=-1, keepdim=True))
            self.merged_index = _cat_index(self.merged_index, positions[merge])
        if kept.numel():
            for i, states in enumerate((first, second)):
                self.retained[i] = _cat(self.retained[i], states.index_select(-2, kept))
            self.retained_index = _cat_index(self.retained_index, positions[kept])
        self.tokens += int(distance.numel())

    def rebuild(self, which: int) -> torch.Tensor | None:
        """Layer ``which`` (0 or 1) of the pair as the model reads it: magnitude x direction for
        merged tokens, the retention tokens exact."""
        if self.tokens == 0:
            return None
        like = self.direction if self.direction is not None else self.retained[which]
        states = like.new_empty((*like.shape[:2], self.tokens, like.shape[-1]))
        if self.merged_index is not None:
            states.index_copy_(-2, self.merged_index, self.direction * self.magnitude[which])
        if self.retained_index is not None:
            states.index_copy_(-2, self.retained_index, self.retained[which])
        return states

    def retained_tokens(self) -> int:
        return 0 if self.retained_index is None else int(self.retained_index.numel())

    def tensors(self) -> list[torch.Tensor]:
        items = [self.direction, self.merged_index, self.retained_index, *self.magnitude, *self.retained]
        return [x for x in items if x is not None]


def retention_threshold(distance: torch.Tensor, retention: float) -> float:
    """The angular distance exceeded by a ``retention`` share of ``distance`` (inf: keep none)."""
    if retention <= 0 or distance.numel() == 0:
        return float("inf")
    if retention >= 1:
        return -1.0
    return float(torch.quantile(distance.double(), 1.0 - retention))


def _cat_index(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if past is None else torch.cat([past, new])


@dataclass
class MergedPair:
    """What layers l and l+1 share: merged keys and values, and l's tokens waiting for l+1."""

    t: float
    retention: float
    keys: MergedStates = field(default_factory=MergedStates)
    values: MergedStates = field(default_factory=MergedStates)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # layer l's newest K/V, raw

    def tensors(self) -> list[torch.Tensor]:
        return self.keys.tensors() + self.values.tensors() + list(self.pending or ())


def _cat(past: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if past is None else torch.cat([past, new], dim=-2)


def _dynamic_layer_class():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _MergedLayerBase:
    """Mixed into transformers' ``DynamicLayer`` (imported lazily): one layer of a merged pair."""

    is_croppable = False

    def __init__(self, pair: MergedPair, which: int):
        super().__init__()
        self.pair, self.which, self.length = pair, which, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)  # empty keys/values, device, dtype
        pair = self.pair
        past_k, past_v = pair.keys.rebuild(self.which), pair.values.rebuild(self.which)
        if self.which == 0:
            raw_k, raw_v = pair.pending if pair.pending is not None else (None, None)
            full_k, full_v = _cat(_cat(past_k, raw_k) if raw_k is not None else past_k, key_states), \
                _cat(_cat(past_v, raw_v) if raw_v is not None else past_v, value_states)
            pair.pending = (_cat(raw_k, key_states), _cat(raw_v, value_states))
        else:
            full_k, full_v = _cat(past_k, key_states), _cat(past_v, value_states)
            first_k, first_v = pair.pending
            pair.pending = None
            pair.keys.merge(first_k, key_states, pair.t, pair.retention)
            pair.values.merge(first_v, value_states, pair.t, pair.retention)
        self.length += int(key_states.shape[-2])
        return full_k, full_v

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover - generate never crops a dynamic cache
        raise ValueError("a MiniCache cache cannot be cropped")

    def reset(self) -> None:
        raise ValueError("a MiniCache cache cannot be reset")


def merged_layer_class():
    """``MergedLayer``: a ``DynamicLayer`` subclass built on first use (transformers loads lazily)."""
    global _MERGED_LAYER
    if _MERGED_LAYER is None:
        _MERGED_LAYER = type("MergedLayer", (_MergedLayerBase, _dynamic_layer_class()), {})
    return _MERGED_LAYER


_MERGED_LAYER = None


def merged_pairs(layers: int, start: float) -> list[tuple[int, int]]:
    """Adjacent layer pairs from ``start`` (a fraction of the depth) to the end; layer 0 never."""
    first = max(1, math.floor(start * layers))
    return [(i, i + 1) for i in range(first, layers - 1, 2)]


def make_minicache(model: Any, start: float, t: float, retention: float) -> tuple[Any, list[MergedPair], list]:
    """A ``DynamicCache`` for ``model`` whose layers from ``start`` on are merged in pairs."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    dynamic = _dynamic_layer_class()
    if any(type(layer) is not dynamic for layer in cache.layers):
        raise ValidationError("MiniCache merges full-attention caches only; this model has sliding-window "
                              "or other special cache layers")
    pairs = merged_pairs(len(cache.layers), start)
    if not pairs:
        raise ValidationError(f"MiniCache: starting at {start} of {len(cache.layers)} layers leaves no pair to merge")
    stores = []
    layer_class = merged_layer_class()
    for first, second in pairs:
        pair = MergedPair(t, retention)
        cache.layers[first], cache.layers[second] = layer_class(pair, 0), layer_class(pair, 1)
        stores.append(pair)
    return cache, stores, pairs


def held_bytes(cache: Any, stores: list[MergedPair]) -> int:
    """Bytes of every K/V tensor the cache holds: plain layers' keys and values, merged pairs'
    directions, magnitudes, retention tokens and pending raw tokens (each storage once)."""
    seen: set[int] = set()
    total = 0
    tensors = [x for layer in cache.layers if type(layer) is _dynamic_layer_class()
               for x in (layer.keys, layer.values) if x is not None]
    for tensor in tensors + [x for pair in stores for x in pair.tensors()]:
        key = tensor.untyped_storage().data_ptr()
        if tensor.numel() == 0 or key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


@dataclass
class MiniCacheRun:
    cache: Any
    stores: list[MergedPair]
    pairs: list[tuple[int, int]]


class MiniCacheConfig(MethodConfig):
    start: float = param(0.5, min=0.05, max=0.95, step=0.05,
                         help="fraction of the depth where merging starts (paper: the middle)")
    t: float = param(0.6, min=0.0, max=1.0, step=0.05,
                     help="SLERP position of the shared direction between layer l (0) and l+1 (1) (paper: 0.6)")
    retention: float = param(0.1, min=0.0, max=1.0, step=0.01,
                             help="share of the prompt's tokens kept unmerged: those whose two layers' vectors are "
                                  "furthest apart (angular distance, mean over heads); the distance it sets on the "
                                  "prompt decides for each decoded token")


@register
class MiniCacheMethod(Method):
    acts_while_decoding = True  # perplexity by teacher-forced decoding (backends/text_eval.py)
    spec = MethodSpec(
        name="minicache",
        title="Cross-layer KV merging (MiniCache)",
        modalities=("text",),
        families=("causal-lm",),
        summary="Adjacent deep layers share one KV direction per token (SLERP) with their own magnitudes; "
                "distinct tokens kept exact. KV memory ~1.3x smaller on the bundled model, slower steps on CPU.",
        paper="Liu et al. 2024, MiniCache: KV Cache Compression in Depth Dimension for Large Language Models "
              "(NeurIPS)",
        lossless=False,
        config=MiniCacheConfig,
        slots=("decoder",),
        defaults_note="retention as a share of the prompt's tokens (10%), the distance it sets then judging each "
                      "decoded token, since tokens decoded one at a time have no spread of their own to compare",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """The merge starts early enough to leave a pair of layers (none in 2 layers)."""
        layers = int(getattr(backend.model.config, "num_hidden_layers", 0) or 0)
        grid = cls.spec.param("start")
        steps = round((grid.max - grid.min) / grid.step)
        starts = [round(grid.min + i * grid.step, 6) for i in range(steps + 1)]
        fit = [s for s in starts if merged_pairs(layers, s)]
        if not fit:
            return Limits(unfit=f"MiniCache: {layers} layers leave no pair of layers to merge")
        return Limits(search_ranges={"start": (None, max(fit))})  # the attach says why a later start fails

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        c = self.config
        cache, stores, pairs = make_minicache(backend.model, c.start, c.t, c.retention)
        run = MiniCacheRun(cache, stores, pairs)
        plan.kwargs["cache"] = cache  # generate() uses a cache it is given instead of building one
        dtype = next(backend.model.parameters()).dtype
        return DecodingHandle(plan, lambda: self.run_stats(backend.model, run, dtype))

    def run_stats(self, model: Any, run: MiniCacheRun, dtype: torch.dtype) -> dict[str, Any]:
        from backends.accel.kv_quant import plain_bytes

        tokens = run.cache.get_seq_length()
        held, plain = held_bytes(run.cache, run.stores), plain_bytes(model.config, tokens, dtype)
        merged_tokens = sum(s.keys.tokens + s.values.tokens for s in run.stores)
        retained = sum(s.keys.retained_tokens() + s.values.retained_tokens() for s in run.stores)
        return {
            "merged_layers": [list(p) for p in run.pairs],
            "cached_tokens": tokens,
            "kv_cache_bytes": held,
            "plain_kv_cache_bytes": plain,
            "kv_compression": round(plain / held, 3) if held else None,
            "retained_fraction": round(retained / merged_tokens, 4) if merged_tokens else 0.0,
        }
