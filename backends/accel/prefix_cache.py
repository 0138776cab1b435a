"""Prefix caching across runs (the automatic prefix caching of vLLM, Kwon et al. 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention"; SGLang's
RadixAttention, Zheng et al. 2024): the K/V of a prompt prefix seen before is reused.

Requests that share a system prompt, few-shot examples or a document recompute the same
K/V at every prefill. Here the prompt's K/V is kept after each run, keyed by its exact
token ids; a later request on the same model looks up the entry with the longest common
token prefix and prefills only the rest (transformers' ``generate`` continues from a
filled ``past_key_values``). Exact: the reused K/V are the ones a full prefill computes
for those positions (causal attention: a prefix's K/V do not depend on what follows), so
the output is plain greedy's; what changes is the time to first token.

The store lives on the backend (``run_memory``): one per loaded model, so entries are never
reused across models, dropped when the model is unloaded. It is bounded by ``budget_mb``
with least-recently-used eviction; an entry whose tokens are a prefix of a newer one's is
replaced by it. With ``disk`` on, entries are also written (safetensors) under the data
dir's ``cache/prefix-kv/<model fingerprint>/`` folder, bounded by the same budget, and
a memory miss is looked up there (a restarted studio reuses them).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodingHandle, cache_layers, set_decoder
from backends.plan import DecodingPlan
from backends.types import ValidationError

MEMORY_KEY = "prefix_cache"
MB = 1 << 20


class PrefixCacheConfig(MethodConfig):
    budget_mb: float = param(256.0, min=1.0, max=65536.0, step=1.0,
                             help="memory (and disk) for kept prefixes; least recently used ones go first")
    min_tokens: int = param(16, min=1, max=4096, help="shortest shared prefix worth reusing (tokens)")
    disk: bool = param(False, help="also keep prefixes on disk, under the data dir's cache folder (kept across "
                                   "restarts)")


@dataclass
class Entry:
    tokens: np.ndarray  # int64 token ids
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), exactly len(tokens) positions

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def model_fingerprint(model_id: str, model: Any) -> str:
    """The model's id, config and a digest of its first and last weights: a disk entry
    written for other weights under the same name is never read."""
    digest = hashlib.sha256(model_id.encode())
    digest.update(model.config.to_json_string().encode())
    params = list(model.parameters())
    for tensor in (params[0], params[-1]):
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:1 << 20])
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_id)[-48:]
    return f"{safe}-{digest.hexdigest()[:16]}"


@dataclass
class PrefixStore:
    """Kept prompt K/V of one model, least recently used first."""

    fingerprint: str
    entries: "OrderedDict[bytes, Entry]" = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def lookup(self, tokens: np.ndarray) -> tuple[Entry | None, int]:
        """The entry sharing the longest token prefix with ``tokens``, and that length (the
        caller marks it used with ``touch`` if it reuses it: a miss changes no order)."""
        best, length = None, 0
        for entry in self.entries.values():
            shared = common_prefix(entry.tokens, tokens)
            if shared > length:
                best, length = entry, shared
        return best, length

    def touch(self, entry: Entry) -> None:
        key = entry.tokens.tobytes()
        if key in self.entries:
            self.entries.move_to_end(key)

    def put(self, entry: Entry, budget: int) -> list[bytes]:
        """Keep ``entry`` (unless a kept one already covers it), drop entries it covers, and
        evict least recently used ones beyond ``budget``; returns the evicted keys."""
        for key, kept in list(self.entries.items()):
            shared = common_prefix(kept.tokens, entry.tokens)
            if shared == len(entry.tokens):  # a kept entry extends this one: keep that one
                self.entries.move_to_end(key)
                return []
            if shared == len(kept.tokens):  # this one extends a kept entry
                del self.entries[key]
        if entry.nbytes > budget:
            return []
        self.entries[entry.tokens.tobytes()] = entry
        return self.shrink(budget)

    def shrink(self, budget: int) -> list[bytes]:
        evicted = []
        while self.entries and self.nbytes > budget:
            key, _ = self.entries.popitem(last=False)
            evicted.append(key)
            self.evictions += 1
        return evicted


def cache_root(backend) -> Path:
    """The data dir's cache folder: the manager's (set by the studio), else
    ``$FASTGEN_DATA_DIR/cache`` (``./data/cache``), as the studio's default data dir."""
    root = getattr(backend, "cache_dir", None)
    return Path(root) if root else Path(os.environ.get("FASTGEN_DATA_DIR", "data")) / "cache"


class DiskPrefixes:
    """Entries as safetensors files (``tokens``, ``k{i}``, ``v{i}``) in one folder per model
    fingerprint; the oldest-used files go first beyond the budget."""

    def __init__(self, folder: Path):
        self.folder = folder

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) if self.folder.is_dir() else []

    def lookup(self, tokens: np.ndarray) -> tuple[Path | None, int]:
        from safetensors import safe_open

        best, length = None, 0
        for path in self.files():
            try:
                with safe_open(str(path), "np") as f:
                    shared = common_prefix(f.get_tensor("tokens"), tokens)
            except Exception:  # a half-written or foreign file: ignored
                continue
            if shared > length:
                best, length = path, shared
        return best, length

    def load(self, path: Path, device: torch.device) -> Entry:
        from safetensors.torch import load_file

        data = load_file(str(path), device=str(device))
        count = sum(1 for name in data if name.startswith("k"))
        os.utime(path)  # used now: evicted last
        return Entry(data["tokens"].cpu().numpy(), [(data[f"k{i}"], data[f"v{i}"]) for i in range(count)])

    def save(self, entry: Entry, budget: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(entry.tokens.tobytes()).hexdigest()[:32] + ".safetensors"
        tensors = {"tokens": torch.from_numpy(entry.tokens.copy())}
        for i, (k, v) in enumerate(entry.layers):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
        temporary = self.folder / (name + ".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, self.folder / name)
        files = self.files()
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= budget:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


def prefix_store(backend) -> PrefixStore:
    memory = getattr(backend, "run_memory", None)
    if memory is None:
        raise ValidationError("the prefix cache needs a text backend that keeps state across runs")
    store = memory.get(MEMORY_KEY)
    if store is None:
        store = memory[MEMORY_KEY] = PrefixStore(model_fingerprint(backend.model_id, backend.model))
    return store


def filled_cache(model, entry: Entry, length: int):
    """A new ``DynamicCache`` holding the first ``length`` positions of ``entry`` (copied by
    the cache's first update, so decoding never writes into the kept tensors)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(entry.layers):
        cache.update(k[..., :length, :], v[..., :length, :], i)
    return cache


def kept_entry(cache, tokens: np.ndarray) -> Entry | None:
    """The prompt's K/V out of a run's cache (its first ``len(tokens)`` positions, copied)."""
    layers = []
    for layer in cache_layers(cache):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() < 3 or keys.shape[-2] < len(tokens):
            return None  # the run stopped before its prefill finished
        layers.append((keys[..., :len(tokens), :].clone(), layer.values[..., :len(tokens), :].clone()))
    return Entry(tokens, layers)


@register
class PrefixCacheMethod(Method):
    spec = MethodSpec(
        name="prefix_cache",
        title="Prefix cache across runs",
        modalities=("text",),
        families=("causal-lm",),
        summary="Reuses the K/V of a prompt prefix seen in an earlier run (same model), so only the new part is "
                "prefilled; exact output, faster time to first token.",
        paper="Kwon et al. 2023, Efficient Memory Management for Large Language Model Serving with PagedAttention "
              "(SOSP; automatic prefix caching); Zheng et al. 2024, SGLang: Efficient Execution of Structured "
              "Language Model Programs (RadixAttention)",
        lossless=True,
        config=PrefixCacheConfig,
        slots=("decoder",),
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        config = self.config
        store = prefix_store(backend)
        budget = int(config.budget_mb * MB)
        store.shrink(budget)
        disk = DiskPrefixes(cache_root(backend) / "prefix-kv" / store.fingerprint) if config.disk else None
        run: dict[str, Any] = {"cached_tokens": 0, "source": "none"}

        def decode(b, input_ids, state) -> None:
            """Lookup, fill and keep run inside the timed decoding: the time to first token
            includes the lookup and the copy of the reused K/V."""
            tokens = input_ids[0].cpu().numpy().astype(np.int64)
            run["prompt_tokens"] = int(len(tokens))
            cache = self.reused_cache(b, store, disk, tokens, budget, run)
            plan.kwargs["past_key_values"] = cache
            try:
                b._hf_generate(plan, state)
            finally:
                del plan.kwargs["past_key_values"]
            kept = kept_entry(cache, tokens)
            if kept is not None:
                store.put(kept, budget)
                if disk is not None and run["cached_tokens"] < len(tokens) - 1:
                    disk.save(kept, budget)

        set_decoder(plan, decode, "the prefix cache")
        return DecodingHandle(plan, lambda: {
            **run, "entries": len(store.entries), "store_mb": round(store.nbytes / MB, 3), "hits": store.hits,
            "misses": store.misses, "evictions": store.evictions,
        })

    def reused_cache(self, backend, store: PrefixStore, disk: DiskPrefixes | None, tokens: np.ndarray, budget: int,
                     run: dict[str, Any]):
        """A cache filled with the longest kept prefix of ``tokens`` (memory, then disk), or
        an empty one; at least one prompt token is left to compute, for the first logits."""
        from transformers import DynamicCache

        entry, shared = store.lookup(tokens)
        source = "memory"
        if disk is not None and shared < len(tokens) - 1:
            path, on_disk = disk.lookup(tokens)
            if path is not None and on_disk > shared:
                entry, shared, source = disk.load(path, backend.device), on_disk, "disk"
                store.put(entry, budget)
        reuse = min(shared, len(tokens) - 1)
        if entry is None or reuse < self.config.min_tokens:
            store.misses += 1
            return DynamicCache(config=backend.model.config)
        store.hits += 1
        store.touch(entry)
        run.update(cached_tokens=reuse, source=source)
        return filled_cache(backend.model, entry, reuse)
