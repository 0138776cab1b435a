"""Everything a user sees or keeps: UI, history, presets, compare, metrics."""
