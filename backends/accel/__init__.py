"""Acceleration methods, one file each. Importing this package imports every method
module beside it (``base`` and ``_private`` helpers excepted), which registers it, so
adding a method is adding a file."""

from __future__ import annotations

import importlib
import logging
import pkgutil

from backends.accel.base import Method, MethodSpec, Param, all_methods, get_method, methods_for

__all__ = ["Method", "MethodSpec", "Param", "all_methods", "get_method", "methods_for", "IMPORT_ERRORS"]

IMPORT_ERRORS: dict[str, str] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name == "base" or _info.name.startswith("_"):
        continue
    try:
        importlib.import_module(f"{__name__}.{_info.name}")
    except Exception as exc:  # one broken method must not take the studio down
        IMPORT_ERRORS[_info.name] = f"{type(exc).__name__}: {exc}"
        logging.getLogger(__name__).error("acceleration method module %s failed to import: %s", _info.name, exc)
