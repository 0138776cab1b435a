"""INT8 attention (SageAttention, Zhang et al. 2025): the diffusion model's attention with
Q and K quantized to int8 per block after K smoothing, P·V in float (``kernels.int8_attention``).

How it is swapped in: each attention module's processor is replaced by
``Int8AttnProcessor``, which runs the *original processor's own* ``__call__`` code with
one name rebound: ``dispatch_attention_fn`` (FLUX, Wan: diffusers' attention dispatcher,
tensors ``[batch, tokens, heads, dim]``) or ``F`` (the UNet's ``AttnProcessor2_0``, which
calls ``F.scaled_dot_product_attention`` on ``[batch, heads, tokens, dim]``). The
projections, norms, rotary embeddings and output layers are diffusers' code, unchanged;
only the softmax attention is computed by the int8 kernel. Nothing global is modified
(the rebinding lives in a copy of the function's globals held by the wrapper), and
``remove`` puts back the very same processor objects: the baseline is bit-identical.

Calls the kernel cannot take (an attention mask, causal or dropout attention, a context
parallel config) go to the original function and are counted as ``fallback_calls``.

Backends:

- ``sdpa``: the CPU path: the int8 Q and K (with their block scales) dequantized and
  handed to PyTorch's fused SDPA. It is **not faster** than plain SDPA on CPU (the same
  float32 attention plus the quantization); it shows what int8 Q·K costs in quality.
- ``torch``: the exact-integer reference (``int8_attention_torch``), unfused: slow.
- ``triton``: our kernel (int8 ``tl.dot``, online softmax), CUDA only.
- ``sage``: the ``sageattention`` package through diffusers' ``sage`` attention backend
  (the same mechanism as the ``attention_backend`` method): SageAttention's own CUDA
  kernels, the paper's ~2.1x over FlashAttention2. Needs a CUDA GPU with the package
  installed and half-precision weights; this code path exists but is not tested here
  (the machines running the tests have no GPU).
- ``auto``: sage on CUDA when ``sageattention`` imports, the model runs in half precision
  and its processors go through the dispatcher (FLUX, Wan; not the UNet), else triton on
  CUDA, else sdpa.
"""

from __future__ import annotations

import importlib.util
import types
from dataclasses import dataclass
from typing import Any

import torch

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

KERNELS = ("auto", "sdpa", "torch", "triton", "sage")


@dataclass
class Int8State:
    """Counts shared by the processors of one run."""

    int8_calls: int = 0
    fallback_calls: int = 0
    score_pairs: int = 0  # (query, key) pairs whose score came from int8 Q·Kᵀ


class _FunctionalWithInt8Sdpa:
    """``torch.nn.functional`` as seen by a rebound processor: the same module except for
    ``scaled_dot_product_attention``."""

    def __init__(self, sdpa):
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)


def rebindable(processor: Any) -> str | None:
    """Which attention call of ``processor`` can be rebound: ``"dispatch"``, ``"sdpa"`` or None."""
    call = getattr(type(processor), "__call__", None)
    code = getattr(call, "__code__", None)
    if code is None or isinstance(processor, torch.nn.Module) or getattr(call, "__closure__", None):
        return None
    if "dispatch_attention_fn" in code.co_names:
        return "dispatch"
    if "F" in code.co_names and "scaled_dot_product_attention" in code.co_names:
        return "sdpa"
    return None


class Int8AttnProcessor:
    """The original processor's ``__call__``, run with the attention call rebound to the
    int8 kernel. Attributes read by diffusers (``_attention_backend``...) come from the
    original."""

    def __init__(self, original: Any, kind: str, state: Int8State, config: "Int8AttentionConfig", kernel: str):
        self.original, self.state, self.config, self.kernel = original, state, config, kernel
        call = type(original).__call__
        scope = dict(call.__globals__)
        if kind == "dispatch":
            self._dispatch = scope["dispatch_attention_fn"]
            scope["dispatch_attention_fn"] = self.dispatch
        else:
            self._sdpa = torch.nn.functional.scaled_dot_product_attention
            scope["F"] = _FunctionalWithInt8Sdpa(self.sdpa)
        self._call = types.FunctionType(call.__code__, scope, call.__name__, call.__defaults__)
        self._call.__kwdefaults__ = call.__kwdefaults__

    def __getattr__(self, name: str) -> Any:
        original = self.__dict__.get("original")
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.original, *args, **kwargs)

    def _int8(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q, k, v ``[batch, heads, tokens, dim]``."""
        from kernels.int8_attention import int8_attention

        config, state = self.config, self.state
        state.int8_calls += 1
        state.score_pairs += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        return int8_attention(q, k, v, block_q=config.block_q, block_k=config.block_k, smooth=config.smooth_k,
                              backend=self.kernel, scale=scale)

    def dispatch(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        plain = (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and not attention_kwargs
                 and parallel_config is None and query.shape[2] == key.shape[2])
        if not plain:
            self.state.fallback_calls += 1
            return self._dispatch(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                  scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs,
                                  backend=backend, parallel_config=parallel_config)
        out = self._int8(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
        return out.transpose(1, 2)

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs or query.shape[1] != key.shape[1]:
            self.state.fallback_calls += 1
            return self._sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **kwargs)
        return self._int8(query, key, value, scale)


def attention_modules(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.hooks._common import _ATTENTION_CLASSES

    return [m for m in denoiser.modules()
            if isinstance(m, _ATTENTION_CLASSES) and getattr(m, "processor", None) is not None]


def sage_installed() -> bool:
    return importlib.util.find_spec("sageattention") is not None


def sage_fits(denoiser: Any, dtype: torch.dtype) -> bool:
    """diffusers' sage backend takes half-precision tensors from dispatched processors."""
    from backends.accel.attention_backend import dispatched_processors

    return dtype in (torch.float16, torch.bfloat16) and bool(dispatched_processors(denoiser))


def resolve_kernel(name: str, device: torch.device, denoiser: Any = None, dtype: torch.dtype = torch.float32) -> str:
    """The kernel a run uses; a one-line ValidationError when it cannot run here."""
    from kernels.int8_attention import triton_available

    cuda = device.type == "cuda"
    if name == "auto":
        if cuda and sage_installed() and denoiser is not None and sage_fits(denoiser, dtype):
            return "sage"
        return "triton" if cuda and triton_available() else "sdpa"
    if name in ("sage", "triton") and not cuda:
        raise ValidationError(f"int8 attention kernel '{name}' needs a CUDA GPU; this model runs on "
                              f"{device.type}. Use kernel 'torch' (or 'auto') here")
    if name == "sage" and not sage_installed():
        raise ValidationError("int8 attention kernel 'sage' needs the sageattention package (pip install "
                              "sageattention)")
    if name == "triton" and not triton_available():
        raise ValidationError("int8 attention kernel 'triton' needs triton (pip install triton)")
    return name


class Int8AttentionConfig(MethodConfig):
    block_q: int = param(128, choices=(16, 32, 64, 128), help="query tokens per int8 quantization block "
                                                              "(one scale each; paper: 128)")
    block_k: int = param(64, choices=(16, 32, 64, 128), help="key tokens per int8 quantization block (paper: 64)")
    smooth_k: bool = param(True, help="subtract the mean key over the tokens before quantizing (leaves softmax "
                                      "unchanged, shrinks the int8 error; paper: on)")
    kernel: str = param("auto", choices=KERNELS,
                        help="auto = sageattention's CUDA kernels when installed on a GPU, else our triton "
                             "kernel on a GPU, else sdpa; sdpa = int8 Q/K dequantized into PyTorch's fused "
                             "attention (CPU; not faster than plain SDPA there); torch = the exact-integer "
                             "reference (slow); triton = our kernel (GPU); sage = the sageattention package "
                             "through diffusers' 'sage' backend (GPU)")


@register
class Int8AttentionMethod(Method):
    spec = MethodSpec(
        name="int8_attention",
        title="INT8 attention (SageAttention)",
        modalities=("image", "video"),
        families=("unet", "dit", "video-dit"),
        summary="Q and K quantized per block to int8 after smoothing K; scores from int8 Q·Kᵀ, softmax and "
                "P·V in float. Lossy (small); fast only with int8 GPU kernels.",
        paper="Zhang et al. 2025, SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference "
              "Acceleration (ICLR)",
        lossless=False,
        config=Int8AttentionConfig,
        slots=("attention",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        dtype = next(denoiser.parameters()).dtype if denoiser is not None else torch.float32
        kernel = resolve_kernel(self.config.kernel, backend.device, denoiser, dtype)
        if kernel == "sage":
            return self._attach_sage(backend, plan)
        modules = [m for m in attention_modules(denoiser) if rebindable(m.processor)] if denoiser is not None else []
        if not modules:
            raise ValidationError(f"int8 attention supports diffusers attention processors that call the "
                                  f"attention dispatcher or SDPA; {type(denoiser).__name__} has none")
        state = Int8State()
        handle = RunHandle(plan, lambda: self.run_stats(state, kernel, len(modules)), lambda _plan: self.notes(kernel))
        with handle.undo_on_error():
            for module in modules:
                handle.on_remove(module.set_processor, module.processor)
                module.set_processor(Int8AttnProcessor(module.processor, rebindable(module.processor), state,
                                                       self.config, kernel))
        return handle

    def _attach_sage(self, backend, plan: DiffusionPlan) -> RunHandle:
        """SageAttention's CUDA kernels via diffusers' dispatcher (not testable without a GPU)."""
        from backends.accel.attention_backend import AttentionBackendMethod

        inner = AttentionBackendMethod(backend="sage").attach(backend, plan)
        handle = RunHandle(plan, lambda: {"kernel": "sage", **inner.stats(), "lossless": False})
        handle.on_remove(inner.remove)
        return handle

    def run_stats(self, state: Int8State, kernel: str, processors: int) -> dict[str, Any]:
        return {
            "kernel": kernel,
            "processors": processors,
            "int8_calls": state.int8_calls,
            "fallback_calls": state.fallback_calls,
            "int8_score_pairs": state.score_pairs,
            "block_q": self.config.block_q,
            "block_k": self.config.block_k,
            "smooth_k": self.config.smooth_k,
        }

    def notes(self, kernel: str) -> list[str]:
        if kernel in ("sdpa", "torch"):
            return ["on CPU int8 attention shows the quality cost of int8 Q·K, not a speedup: it runs PyTorch's "
                    "float attention on the int8 values (the gain needs int8 GPU kernels)"]
        return []
