"""Prefix caching across runs (the automatic prefix caching of vLLM, Kwon et al. 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention"; SGLang's
RadixAttention, Zheng et al. 2024): the K/V of a prompt prefix seen before is reused.

Requests that share a system prompt, few-shot examples or a document recompute the same
K/V at every prefill. Here the prompt is cut into blocks of ``block_tokens`` tokens, as
vLLM does: a block's key is the hash of its parent block's key and its own token ids, so a
key names the whole prefix up to that block, and prompts sharing a prefix share its blocks
(kept once, not once per prompt). A later request walks its blocks from the start while
their keys are kept, copies their K/V into a fresh cache and prefills only the rest
(transformers' ``generate`` continues from a filled cache). Exact: a prefix's K/V do not
depend on what follows it (causal attention), so the output is plain greedy's; what
changes is the time to first token.

The store lives on the backend (``run_memory``): one per loaded model, dropped when the
model is unloaded; the first block's parent key is the model's fingerprint with the weights
it runs (a quantized run's tag) and its device and dtype, so no key is ever valid for two
models or two weight formats. It is bounded by ``budget_mb``, evicting least recently used
blocks that no kept block continues (leaves first, as vLLM's evictor). With ``disk`` on,
blocks are also written as safetensors files named by their key under the data dir's
``cache/prefix-kv/<model fingerprint>/`` (same budget, oldest used first) and a block
missing in memory is read from there, so a restarted studio reuses them.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodingHandle, cache_layers, set_decoder
from backends.plan import DecodingPlan
from backends.types import ValidationError

MEMORY_KEY = "prefix_cache"
MB = 1 << 20


class PrefixCacheConfig(MethodConfig):
    budget_mb: float = param(256.0, min=1.0, max=65536.0, step=1.0,
                             help="memory (and disk) for kept blocks; least recently used ones go first")
    block_tokens: int = param(16, min=1, max=512, help="tokens per block: prefixes are matched in whole blocks "
                                                       "(vLLM's default block size is 16)")
    min_tokens: int = param(16, min=1, max=4096, help="shortest shared prefix worth reusing (tokens)")
    disk: bool = param(False, help="also keep blocks on disk, under the data dir's cache folder (kept across "
                                   "restarts)")


@dataclass
class Block:
    """One block of a kept prefix: its key, its parent's, and its K/V per layer."""

    key: str
    parent: str
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    children: int = 0

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def block_key(parent: str, tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(f"{parent}:{','.join(map(str, tokens))}".encode()).hexdigest()[:32]


def block_keys(root: str, tokens: list[int], size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, parent key, tokens) of every whole block of ``tokens``, in order."""
    out, parent = [], root
    for start in range(0, len(tokens) - size + 1, size):
        chunk = tuple(tokens[start:start + size])
        key = block_key(parent, chunk)
        out.append((key, parent, chunk))
        parent = key
    return out


def model_fingerprint(model_id: str, model: Any) -> str:
    """The model's id, config and a digest of its first and last weights: the root of every
    block key, so blocks of another model (or other weights under the same name) never match."""
    digest = hashlib.sha256(model_id.encode())
    digest.update(model.config.to_json_string().encode())
    params = list(model.parameters())
    for tensor in (params[0], params[-1]):
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:1 << 20])
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_id)[-48:]
    return f"{safe}-{digest.hexdigest()[:16]}"


def block_root(fingerprint: str, backend: Any) -> str:
    """The parent key of a prompt's first block: the model's fingerprint, the weights it runs
    now (``weights_tag``, published by an attached weight method such as weight_quant or
    awq) and its device and dtype, all of which change the K/V. Read at lookup time, so a
    quantized run never hands its K/V to a plain one (nor a CPU float32 run to a GPU one)."""
    first = next(backend.model.parameters())
    where = f"{getattr(backend, 'weights_tag', '')}|{first.device}|{first.dtype}"
    return f"{fingerprint}-{hashlib.sha256(where.encode()).hexdigest()[:16]}"


@dataclass
class PrefixStore:
    """The kept blocks of one model, least recently used first."""

    fingerprint: str
    blocks: "OrderedDict[str, Block]" = field(default_factory=OrderedDict)
    nbytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def add(self, block: Block) -> None:
        if block.key in self.blocks:
            self.blocks.move_to_end(block.key)
            return
        self.blocks[block.key] = block
        self.nbytes += block.nbytes
        if block.parent in self.blocks:
            self.blocks[block.parent].children += 1

    def touch(self, key: str) -> None:
        self.blocks.move_to_end(key)

    def shrink(self, budget: int) -> int:
        """Evict least recently used leaf blocks until the store fits ``budget``."""
        evicted = 0
        while self.nbytes > budget and self.blocks:
            key = next((k for k, b in self.blocks.items() if b.children == 0), next(iter(self.blocks)))
            block = self.blocks.pop(key)
            self.nbytes -= block.nbytes
            if block.parent in self.blocks:
                self.blocks[block.parent].children -= 1
            evicted += 1
        self.evictions += evicted
        return evicted


def cache_root(backend) -> Path:
    """The data dir's cache folder: the manager's (set by the studio), else
    ``$FASTGEN_DATA_DIR/cache`` (``./data/cache``), as the studio's default data dir."""
    root = getattr(backend, "cache_dir", None)
    return Path(root) if root else Path(os.environ.get("FASTGEN_DATA_DIR", "data")) / "cache"


class DiskBlocks:
    """Blocks as safetensors files named by their key (``k{i}``/``v{i}`` per layer); the
    oldest used go first beyond the budget."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str, parent: str, tokens: tuple[int, ...], device: torch.device) -> Block | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = load_file(str(path), device=str(device))
        except Exception:  # a half-written or foreign file: not used
            return None
        os.utime(path)  # used now: evicted last
        count = sum(1 for name in data if name.startswith("k"))
        return Block(key, parent, tokens, [(data[f"k{i}"], data[f"v{i}"]) for i in range(count)])

    def save(self, blocks: list[Block], budget: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        for block in blocks:
            tensors = {}
            for i, (k, v) in enumerate(block.layers):
                tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
            temporary = self.folder / f"{block.key}.tmp"
            save_file(tensors, str(temporary))
            os.replace(temporary, self.path(block.key))
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= budget:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


def backend_store(backend, key: str, what: str) -> PrefixStore:
    """The block store ``key`` kept on a loaded text model (its ``run_memory``, dropped on
    unload): one per method that reuses K/V across runs (the prefix cache, chunk reuse)."""
    memory = getattr(backend, "run_memory", None)
    if memory is None:
        raise ValidationError(f"{what} needs a text backend that keeps state across runs")
    store = memory.get(key)
    if store is None:
        store = memory[key] = PrefixStore(model_fingerprint(backend.model_id, backend.model))
    return store


def prefix_store(backend) -> PrefixStore:
    return backend_store(backend, MEMORY_KEY, "the prefix cache")


def filled_cache(model, chain: list[Block]):
    """A new ``DynamicCache`` holding the K/V of ``chain``'s blocks, in order (copied, so
    decoding never writes into the kept tensors)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if chain:
        for i in range(len(chain[0].layers)):
            cache.update(torch.cat([b.layers[i][0] for b in chain], dim=-2),
                         torch.cat([b.layers[i][1] for b in chain], dim=-2), i)
    return cache


def new_blocks(cache, keys: list[tuple[str, str, tuple[int, ...]]], have: int, size: int) -> list[Block]:
    """Blocks ``have``.. of the prompt, cut from the run's cache (copied)."""
    layers = cache_layers(cache)
    out = []
    for index in range(have, len(keys)):
        start, stop = index * size, (index + 1) * size
        slices = []
        for layer in layers:
            keys_tensor = getattr(layer, "keys", None)
            if keys_tensor is None or keys_tensor.dim() < 3 or keys_tensor.shape[-2] < stop:
                return out  # the run stopped before its prefill finished
            slices.append((keys_tensor[..., start:stop, :].clone(), layer.values[..., start:stop, :].clone()))
        key, parent, tokens = keys[index]
        out.append(Block(key, parent, tokens, slices))
    return out


@register
class PrefixCacheMethod(Method):
    spec = MethodSpec(
        name="prefix_cache",
        title="Prefix cache across runs",
        modalities=("text",),
        families=("causal-lm",),
        summary="Reuses the K/V of a prompt prefix seen in an earlier run (same model, kept in hashed blocks), so "
                "only the new part is prefilled; exact output, faster time to first token.",
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
        disk = DiskBlocks(cache_root(backend) / "prefix-kv" / store.fingerprint) if config.disk else None
        run: dict[str, Any] = {"cached_tokens": 0, "blocks_from_disk": 0}

        def decode(b, input_ids, state) -> None:
            """Lookup, copy and keep run inside the timed decoding: the time to first token
            includes the lookup and the copy of the reused K/V."""
            tokens = input_ids[0].tolist()
            run["prompt_tokens"] = len(tokens)
            keys = block_keys(block_root(store.fingerprint, b), tokens, config.block_tokens)
            chain = self.reused_chain(b, store, disk, keys, len(tokens), run)
            cache = filled_cache(b.model, chain)
            plan.kwargs["past_key_values"] = cache
            try:
                b._hf_generate(plan, state)
            finally:
                del plan.kwargs["past_key_values"]
            added = new_blocks(cache, keys, len(chain), config.block_tokens)
            for block in added:
                store.add(block)
            store.shrink(budget)
            if disk is not None and added:
                disk.save(added, budget)

        set_decoder(plan, decode, "the prefix cache")
        return DecodingHandle(plan, lambda: {
            **run, "blocks": len(store.blocks), "store_mb": round(store.nbytes / MB, 3), "hits": store.hits,
            "misses": store.misses, "evictions": store.evictions,
        })

    def reused_chain(self, backend, store: PrefixStore, disk: DiskBlocks | None,
                     keys: list[tuple[str, str, tuple[int, ...]]], prompt_tokens: int, run: dict[str, Any]):
        """The kept blocks that start the prompt (memory, else disk), leaving at least one
        prompt token to compute (the first logits come from it); empty below ``min_tokens``."""
        size = self.config.block_tokens
        usable = (prompt_tokens - 1) // size  # whole blocks before the last prompt token
        chain: list[Block] = []
        for key, parent, tokens in keys[:usable]:
            block = store.blocks.get(key)
            if block is None and disk is not None:
                block = disk.load(key, parent, tokens, backend.device)
                if block is not None:
                    store.add(block)
                    run["blocks_from_disk"] += 1
            if block is None:
                break
            chain.append(block)
        if len(chain) * size < self.config.min_tokens:
            store.misses += 1
            return []
        for block in chain:  # root first: a chain's leaf is its most recently used block
            store.touch(block.key)
        store.hits += 1
        run["cached_tokens"] = len(chain) * size
        return chain
