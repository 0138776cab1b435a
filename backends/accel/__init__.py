"""Acceleration methods, one file each; importing this package registers them all."""

from backends.accel import (  # noqa: F401
    cfg_truncation,
    deepcache,
    sampler,
)
from backends.accel.base import Method, MethodSpec, Param, all_methods, get_method, methods_for

__all__ = ["Method", "MethodSpec", "Param", "all_methods", "get_method", "methods_for"]
