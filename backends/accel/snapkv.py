"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").
Lossy.

After the prefill of a long prompt, the attention that the last ``window`` prompt tokens
(the "observation window") pay to earlier positions predicts which positions generation
will attend to. Per layer and per KV head, those scores are summed over the window's
queries, smoothed with a 1-D pooling (clusters of neighbouring tokens survive together),
and the top ``budget`` earlier positions are kept, plus the window itself. Decoding then
runs normally on the compressed cache: less memory, shorter attention per token.

The window's queries are recomputed from the hidden states entering each attention layer
(captured by a forward pre-hook during prefill), so the prefill itself can use any
attention kernel (SDPA, flash) that never materialises attention weights. Heads that share
a KV head (GQA) vote with their mean. Kept keys carry their original RoPE positions, so
new tokens are given their true text positions, not cache indices. A prompt no longer
than ``budget + window`` is left untouched (output equals plain decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodeState, DecodingHandle, set_decoder
from backends.plan import DecodingPlan
from backends.types import ValidationError


@dataclass
class SnapKVState:
    prompt_tokens: int = 0
    kept_tokens: int = 0
    compressed: bool = False

    def reset(self) -> None:
        self.prompt_tokens = self.kept_tokens = 0
        self.compressed = False


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def window_scores(attn: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  keys: torch.Tensor) -> torch.Tensor:
    """Attention of the last ``w`` prompt tokens (``hidden``: (1, w, D)) to all ``L`` cached keys,
    summed over the window's queries: (1, kv_heads, groups, L)."""
    w, length = hidden.shape[1], keys.shape[-2]
    q = attn.q_proj(hidden).view(1, w, -1, attn.head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    kv_heads = keys.shape[1]
    q = q.reshape(1, kv_heads, -1, w, attn.head_dim)  # (1, kv, groups, w, d)
    scores = torch.einsum("bkgwd,bkld->bkgwl", q.float(), keys.float()) * attn.scaling
    causal = torch.arange(length, device=keys.device)[None, :] > (length - w + torch.arange(w, device=keys.device))[:, None]
    scores = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    return scores.sum(dim=-2)


def compress(cache: Any, captured: dict[int, tuple], attn_modules: list[Any], budget: int, window: int,
             kernel: int) -> int:
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        length = keys.shape[-2]
        hidden, cos, sin = captured[i]
        votes = window_scores(attn_modules[i], hidden, cos, sin, keys)[..., : length - window]
        votes = votes.mean(dim=2)  # (1, kv, L - w): GQA heads vote together
        if kernel > 1:
            votes = F.avg_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1,
                                 count_include_pad=False)[..., : length - window]
        keep = votes.topk(budget, dim=-1).indices.sort(dim=-1).values  # (1, kv, budget)
        index = keep[..., None].expand(-1, -1, -1, keys.shape[-1])
        layer.keys = torch.cat([keys.gather(2, index), keys[..., length - window:, :]], dim=-2)
        layer.values = torch.cat([values.gather(2, index), values[..., length - window:, :]], dim=-2)
    return budget + window


def snapkv_decode(backend, input_ids: torch.Tensor, state: DecodeState, budget: int, window: int, kernel: int,
                  stats: SnapKVState) -> None:
    from transformers import DynamicCache

    model = backend.model
    attn_modules = [layer.self_attn for layer in model.model.layers]
    length = int(input_ids.shape[-1])
    compress_now = length > budget + window
    captured: dict[int, tuple] = {}
    handles = []
    if compress_now:
        for i, attn in enumerate(attn_modules):
            def capture(_module, args, kwargs, i=i):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                cos, sin = kwargs["position_embeddings"]
                captured[i] = (hidden[:, -window:], cos[:, -window:], sin[:, -window:])

            handles.append(attn.register_forward_pre_hook(capture, with_kwargs=True))
    cache = DynamicCache(config=model.config)
    try:
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    stats.prompt_tokens = length
    stats.kept_tokens = compress(cache, captured, attn_modules, budget, window, kernel) if compress_now else length
    stats.compressed = compress_now
    position = length
    while True:
        token = int(state.sampling.pick(logits))
        if state.emit([token]):
            return
        ids = torch.tensor([[token]], device=input_ids.device)
        # kept keys hold their text positions: the new token gets its text position too
        logits = model(input_ids=ids, position_ids=torch.tensor([[position]], device=ids.device),
                       past_key_values=cache, use_cache=True).logits[0, -1]
        position += 1


class SnapKVConfig(MethodConfig):
    budget: int = param(1024, min=4, max=32768, help="earlier prompt positions kept per head")
    window: int = param(32, min=1, max=512, help="observation window: last prompt tokens that vote")
    kernel: int = param(7, min=1, max=31, step=2, help="pooling width of the votes (odd; paper: 7)")


@register
class SnapKVMethod(Method):
    spec = MethodSpec(
        name="snapkv",
        title="SnapKV prompt KV compression",
        modalities=("text",),
        families=("causal-lm",),
        summary="After prefill keep, per head, only the prompt positions the last prompt tokens attend to most; "
                "lossy on long prompts.",
        paper="Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation (NeurIPS)",
        lossless=False,
        config=SnapKVConfig,
        slots=("decoder",),
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        layers = getattr(getattr(backend.model, "model", None), "layers", None)
        if layers is None or not all(hasattr(layer.self_attn, "q_proj") for layer in layers):
            raise ValidationError("SnapKV needs a Llama-style decoder (model.layers[i].self_attn.q_proj)")
        if self.config.kernel % 2 == 0:
            raise ValidationError("SnapKV pooling kernel must be odd")
        c, s = self.config, SnapKVState()
        set_decoder(plan, lambda b, ids, state: snapkv_decode(b, ids, state, c.budget, c.window, c.kernel, s),
                    "SnapKV")
        return DecodingHandle(plan, lambda: dict(
            prompt_tokens=s.prompt_tokens, kept_prompt_tokens=s.kept_tokens, compressed=s.compressed,
            kept_fraction=round(s.kept_tokens / s.prompt_tokens, 3) if s.prompt_tokens else 1.0), self.notes)

    def notes(self, plan: DecodingPlan) -> list[str]:
        length = int(plan.input_ids.shape[-1])
        if length <= self.config.budget + self.config.window:
            return [f"the prompt ({length} tokens) fits in budget + window: SnapKV keeps everything, no saving"]
        return [f"SnapKV keeps {self.config.budget + self.config.window} of {length} prompt positions per "
                "head: output may differ from plain decoding"]
