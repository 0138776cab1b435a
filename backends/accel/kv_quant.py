"""Quantized KV cache (KIVI, Liu et al. 2024; GEAR, Kang et al. 2024): past keys and values
stored as 2/4/8-bit integers with a per-group scale and zero point, the most recent tokens
kept in full precision.

Built on transformers' ``QuantizedCache`` with the HQQ backend (``pip install hqq``).
Why HQQ and not quanto: transformers' quanto layer takes 2 or 4 bits only (this method
offers 8 too), and optimum-quanto was measured slower than plain on these CPUs for
weights (issue 18). HQQ's quantizer runs on CPU with torch 2.13. The layout is KIVI's:
keys grouped per channel (``axis_key=0``: a group runs along the tokens of one channel,
where the outlier channels of keys live), values per token (``axis_value=1``). How the
cache works (transformers' ``QuantizedLayer``): the prompt is quantized at once; new
tokens go to a full-precision residual; when the residual reaches ``residual_length``
tokens, the whole cache is dequantized, joined with it and quantized again.

What it buys: memory. An fp32 key or value element takes 4 bytes plain; at 4 bits with
groups of 64 it takes 0.5 byte + 8 bytes of scale and zero per 64 elements = 0.625 byte
(6.4x smaller), plus at most ``residual_length - 1`` tokens held in full precision.
``stats`` reports the bytes the cache object actually held at the end of the run
(``kv_cache_bytes``) beside what a plain cache holds for as many tokens
(``plain_kv_cache_bytes``). What it costs: speed on CPU (every forward dequantizes the
whole cache, every ``residual_length`` tokens it is quantized again; the papers' 2.38x
throughput comes from larger batches fitting in GPU memory, not from faster steps) and a
little accuracy (greedy output drifts from plain decoding after some tokens; see the
perplexity delta in benchmarks/results/kvquant-*.json).

Takes the ``decoder`` slot: a method that runs its own decoding loop builds its own cache.
Nothing on the model is patched: the run gets a fresh cache object, so removal restores
plain decoding trivially.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from backends.accel._decoding import DecodingHandle
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DecodingPlan
from backends.types import ValidationError

AXIS_KEY, AXIS_VALUE = 0, 1  # KIVI: keys per channel, values per token


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` through tuples, lists, dicts and object
    attributes (each storage counted once): what a cache layer actually holds."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item, seen) for item in obj.values())
    return 0


def cache_bytes(cache: Any) -> int:
    """Bytes held by the K/V states of a transformers cache (quantized or plain)."""
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        total += sum(tensor_bytes(value, seen) for name, value in vars(layer).items()
                     if name in ("keys", "values", "_quantized_keys", "_quantized_values"))
    return total


def plain_bytes(config: Any, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes a plain (dynamic) cache holds for ``tokens`` positions of this model."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * batch * heads * tokens * head_dim * element


def hqq_installed() -> bool:
    return importlib.util.find_spec("hqq") is not None


def make_quantized_cache(model: Any, bits: int, group_size: int, residual_length: int):
    """A fresh HQQ-backed ``QuantizedCache`` for ``model``; one-line errors for what cannot work."""
    if not hqq_installed():
        raise ValidationError("kv_quant needs the hqq package (pip install hqq)")
    from transformers import QuantizedCache

    try:
        return QuantizedCache("hqq", model.config, nbits=bits, axis_key=AXIS_KEY, axis_value=AXIS_VALUE,
                              q_group_size=group_size, residual_length=residual_length)
    except ValueError as exc:  # e.g. sliding-window layers, which QuantizedCache refuses
        raise ValidationError(f"kv_quant cannot quantize this model's cache: {str(exc).splitlines()[0]}") from None


@dataclass
class KVQuantRun:
    cache: Any = None


class KVQuantConfig(MethodConfig):
    bits: int = param(4, choices=(2, 4, 8), help="bits per cached key/value element (KIVI: 2; GEAR: 4)",
                      paper=2)
    residual_length: int = param(64, min=1, max=1024, help="most recent tokens kept in full precision before "
                                                           "they are quantized (KIVI: 128)", paper=128)
    group_size: int = param(64, choices=(16, 32, 64, 128), help="elements sharing one scale and zero point "
                                                                "(KIVI: 32); smaller = more accurate, more bytes",
                            paper=32)


@register
class KVQuantMethod(Method):
    spec = MethodSpec(
        name="kv_quant",
        title="Quantized KV cache (KIVI/GEAR)",
        modalities=("text",),
        families=("causal-lm",),
        summary="Past keys (per channel) and values (per token) stored in 2/4/8 bits with a full-precision "
                "window of recent tokens; KV memory 3-6x smaller, slower steps on CPU.",
        paper="Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (ICML); "
              "Kang et al. 2024, GEAR",
        lossless=False,
        config=KVQuantConfig,
        slots=("decoder",),
        defaults_note="4 bits, groups of 64 and a 64-token residual: 4 bits keeps greedy output close on the "
                      "tiny model, and a 64-token window keeps the cache >= 3x smaller at 512 tokens "
                      "whatever the residual holds",
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        config = self.config
        run = KVQuantRun(make_quantized_cache(backend.model, config.bits, config.group_size,
                                              config.residual_length))
        plan.kwargs["cache"] = run.cache  # generate() uses a cache it is given instead of building one
        dtype = next(backend.model.parameters()).dtype
        return DecodingHandle(plan, lambda: self.run_stats(backend.model, run, dtype), self.notes)

    def run_stats(self, model: Any, run: KVQuantRun, dtype: torch.dtype) -> dict[str, Any]:
        tokens = run.cache.get_seq_length()
        held, plain = cache_bytes(run.cache), plain_bytes(model.config, tokens, dtype)
        return {
            "bits": self.config.bits,
            "cached_tokens": tokens,
            "kv_cache_bytes": held,
            "plain_kv_cache_bytes": plain,
            "kv_compression": round(plain / held, 3) if held else None,
        }

    def notes(self, plan: DecodingPlan) -> list[str]:
        total = int(plan.input_ids.shape[-1]) + plan.max_new_tokens
        if total <= self.config.residual_length:
            return [f"prompt + output ({total} tokens) fit in the full-precision window "
                    f"({self.config.residual_length}): only the prompt is quantized"]
        return []
