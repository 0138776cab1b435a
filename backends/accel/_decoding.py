"""Decoding-loop plumbing shared by the text backend and its methods.

Kept apart from ``backends.text`` so method modules can import it without importing the
backend (``backends.accel`` is imported while ``backends.base`` loads).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from backends.plan import DecodingPlan, RunHandle
from backends.types import ValidationError

Decoder = Callable[[Any, torch.Tensor, "DecodeState"], None]


@dataclass
class Sampling:
    """The request's sampling settings, applied the way ``generate`` applies them
    (temperature, then top-k, then top-p); greedy when ``do_sample`` is False."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(int(self.seed))

    @functools.cached_property
    def warpers(self) -> LogitsProcessorList:
        """transformers' own temperature, top-k and top-p warpers, in ``generate``'s order."""
        warpers = LogitsProcessorList([TemperatureLogitsWarper(max(self.temperature, 1e-5))])
        if self.top_k:
            warpers.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(self.top_p)))
        return warpers

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids for ``logits`` of shape (..., vocab)."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        flat = logits.float().reshape(-1, logits.shape[-1])
        warped = self.warpers(None, flat)  # these warpers read only the scores, not the input ids
        probs = warped.softmax(dim=-1).cpu()
        picked = torch.multinomial(probs, 1, generator=self.generator).reshape(logits.shape[:-1])
        return picked.to(logits.device)


@dataclass
class DecodeState:
    """Tokens as they are accepted: budget and EOS, streaming, first-token time."""

    max_new_tokens: int
    eos_token_ids: set[int]
    sampling: Sampling
    on_tokens: Callable[[list[int]], None] | None = None
    tokens: list[int] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: bool = False
    per_step: list[int] = field(default_factory=list)  # tokens kept per emit (per verification forward)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def emit(self, new_tokens: list[int] | torch.Tensor) -> bool:
        """Accept tokens in order; returns True once generation must stop."""
        if isinstance(new_tokens, torch.Tensor):
            new_tokens = new_tokens.reshape(-1).tolist()
        taken = []
        for token in new_tokens:
            if self.finished:
                break
            taken.append(int(token))
            if int(token) in self.eos_token_ids or len(self.tokens) + len(taken) >= self.max_new_tokens:
                self.finished = True
        self.per_step.append(len(taken))
        self.record(taken)
        return self.finished

    def record(self, taken: list[int]) -> None:
        if not taken:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(taken)
        if self.on_tokens is not None:
            self.on_tokens(list(self.tokens))


def accept_greedy(drafts: list[int], greedy: list[int]) -> list[int]:
    """Tokens kept from one verification forward over ``[current, *drafts]`` whose argmax
    at each position is ``greedy``: drafts while they equal the model's own choice, then
    the model's token at the first disagreement (or after the last draft)."""
    accepted = [greedy[0]]
    for j, token in enumerate(drafts):
        if token != accepted[-1]:
            break
        accepted.append(greedy[j + 1])
    return accepted


def require_greedy(plan: DecodingPlan, method: str) -> None:
    if plan.sampling.do_sample:
        raise ValidationError(
            f"{method} is implemented for greedy decoding only (temperature 0, do_sample off); "
            "it would not preserve the sampling distribution"
        )


def set_decoder(plan: DecodingPlan, decoder: Decoder, method: str) -> None:
    if plan.decoder is not None:
        raise ValidationError(f"{method} replaces the decoding loop, and another method already did")
    plan.decoder = decoder


class DecodingHandle(RunHandle):
    """One run of a decoding method: the plan's token and forward counts (``decoding_stats``)
    before the method's own figures."""

    def stats(self) -> dict[str, Any]:
        return {**decoding_stats(self.plan.extra), **super().stats()}


def decoding_stats(extra: dict[str, Any]) -> dict[str, Any]:
    """Tokens, target forwards and accepted draft tokens of the last run."""
    tokens, forwards = extra.get("tokens_generated", 0), extra.get("target_forwards", 0)
    return {
        "tokens": tokens,
        "target_forwards": forwards,
        "tokens_per_target_forward": round(tokens / forwards, 3) if forwards else 0.0,
        "accepted_draft_tokens": max(0, tokens - forwards),
    }


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer K/V holders of a transformers ``DynamicCache`` (``.keys``/``.values``)."""
    return list(cache.layers)


def crop_cache(cache: Any, length: int) -> None:
    """Truncate every layer to ``length`` positions (layers shorter are left alone)."""
    for layer in cache_layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
