"""``python -m benchmarks --list-methods [--json FILE]``: every registered method, as data.

One entry per method: name, title, summary, modalities, families, slots, lossless, paper,
and each Config field with its kind, default, range, step, choices, help and the paper's
setting where the default differs. All of it comes from the method specs, so this is the
same contract the UI, the validator and the presets use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from backends.accel import IMPORT_ERRORS
from backends.accel.base import all_methods


def method_listing() -> dict[str, Any]:
    """``modes``: methods that are a way of running rather than a patch of one run (the
    Image tab's Stream mode, StreamDiffusion), described by the same kind of spec."""
    from backends.stream import STREAM_SPEC

    methods = [cls.spec.describe() for _, cls in sorted(all_methods().items())]
    return {"methods": methods, "modes": [STREAM_SPEC.describe()], "import_errors": dict(IMPORT_ERRORS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --list-methods", description=__doc__.split("\n")[0])
    parser.add_argument("--list-methods", action="store_true", required=True)
    parser.add_argument("--json", help="write the listing here (default: print it)")
    args = parser.parse_args(argv)
    text = json.dumps(method_listing(), indent=2, ensure_ascii=False) + "\n"
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
        print(f"{len(all_methods())} methods written to {args.json}")
    else:
        print(text, end="")
    return 0
