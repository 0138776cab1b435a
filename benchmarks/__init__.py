"""``python -m benchmarks``: speed and quality ratios, measured in one process, interleaved."""
