"""TEST AID ONLY: lets diffusers' context parallelism run on CPU with gloo, for correctness tests.

Not part of the product: ``backends.parallel`` is a GPU feature. On a machine without an
accelerator two things stop diffusers 0.42 from running it, and ``install()`` patches both,
in the calling process only:

1. Each rank's device is ``rank % torch.accelerator.device_count()``, a division by zero
   without an accelerator: ``device_count()`` is made to answer 1 (the CPU).
2. Ring attention merges partial results by log-sum-exp, so ``backends.parallel`` routes it
   to diffusers' ``_native_flash`` backend, which calls ``aten::_scaled_dot_product_flash_attention``;
   that op has CUDA kernels only. A CPU kernel is registered for it that calls PyTorch's own
   CPU flash kernel ``aten::_scaled_dot_product_flash_attention_for_cpu`` (same output and
   log-sum-exp, (B, H, L) float32).

On a machine with an accelerator ``install()`` does nothing. Ulysses needs only (1).

Activated by ``tests/test_context_parallel.py`` through a ``sitecustomize.py`` written into a
temporary directory that is put first on ``PYTHONPATH`` of the torchrun subprocess only;
nothing imports it in a normal run.
"""

from __future__ import annotations

_LIBRARY = None  # keeps the kernel registration alive


def _flash_attention_cpu(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    import torch

    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)
    empty = query.new_empty(0)
    # (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)
    return out, lse, empty, empty, query.shape[-2], key.shape[-2], empty, empty, empty


def install() -> bool:
    """Apply both patches in this process; False (and no change) if there is an accelerator."""
    global _LIBRARY
    import torch

    if torch.accelerator.device_count() > 0 or _LIBRARY is not None:
        return False
    torch.accelerator.device_count = lambda: 1
    _LIBRARY = torch.library.Library("aten", "IMPL")
    _LIBRARY.impl("_scaled_dot_product_flash_attention", _flash_attention_cpu, "CPU")
    return True


def sitecustomize_source(shim_dir: str) -> str:
    """Body of a ``sitecustomize.py`` that installs this shim at interpreter start."""
    return (
        "import sys\n"
        f"sys.path.insert(0, {shim_dir!r})\n"
        "import _cp_cpu_shim\n"
        "_cp_cpu_shim.install()\n"
        f"sys.path.remove({shim_dir!r})\n"
    )
