"""Attention kernels, each with a pure-torch reference that is both the CPU fallback and
the test oracle. Triton is optional: kernels that need it import it lazily and the
public functions pick another path when it is missing.

- ``kernels.sta``: sliding tile attention for video DiTs (``sliding_tile_attention``).
- ``kernels.int8_attention``: SageAttention's int8 Q·K attention (``int8_attention``).
"""

from kernels.sta import kept_fraction, sliding_tile_attention

__all__ = ["kept_fraction", "sliding_tile_attention"]
