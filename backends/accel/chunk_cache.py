"""Context-chunk reuse with selective recompute (Yao et al. 2024, "CacheBlend: Fast Large
Language Model Serving for RAG with Cached Knowledge Fusion"; EuroSys 2025).

The prefix cache only reuses a prompt's *start*. Prompts made of documents (retrieved
passages, source files, few-shot examples) share chunks in any order and at any place,
whose K/V depend on what precedes them. Here the prompt is cut into chunks at a separator
(a blank line by default); each chunk's K/V is computed once on its own (positions 0..n-1,
no preceding context) and kept on the backend in an LRU store under a byte budget (the
prefix cache's ``PrefixStore``, keyed by the model's fingerprint and the chunk's tokens).
A later request whose chunks were seen, in any order, concatenates their kept K/V instead
of prefilling them, then restores part of the cross-chunk attention the independent
prefills missed:

* layer 0 runs in full over the whole prompt, and layer 1 up to its K/V (CacheBlend's check
  layer is layer 1: layer 0's K/V depend only on a token and its position, so they never
  deviate);
* on layer 1, the chunk tokens whose recomputed keys deviate most from the reused ones
  (CacheBlend's "high-KV-deviation" tokens; relative deviation, see ``deviating_tokens``),
  ``recompute`` of them (15%, the paper's setting), plus every token after the last chunk
  (the question), go on through layers 1.. with full attention over the whole prompt;
  their new K/V replace the reused ones;
* transformers' ``generate`` then continues from the blended cache (the last prompt token
  gives the first logits), so decoding is the plain loop.

Positions: the model's cache holds keys after RoPE, so a chunk is kept as its own prefill
left it (positions from 0) and re-rotated by its offset when placed (``R(p + d) = R(d)R(p)``:
one rotation per chunk and layer, exact up to rounding; a chunk at offset 0 is used as
kept). Storing pre-RoPE keys instead would need the attention patched to capture them;
this needs nothing but the model's own rotary embedding, and is refused for RoPE variants
where a position shift is not a plain rotation (dynamic NTK, YaRN's attention scaling).

Lossy: the 85% of chunk tokens not recomputed keep K/V from layers 2.. that never saw the
chunks before them. ``recompute=1`` recomputes every token, which is full prefill (the
output is plain decoding's; nothing is saved). The output does not depend on what the
store holds (a missing chunk is computed on its own exactly as a kept one was), so the
first and later requests for a prompt give the same tokens. Held-out perplexity says
nothing here (the model is unchanged; only prompts built of chunks are affected): quality
is the output's agreement with full prefill. Takes the ``decoder`` slot: it owns the
prefill and hands transformers' ``generate`` a filled cache, as the prefix cache does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from backends.accel._decoding import DecodingHandle, set_decoder
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel.prefix_cache import MB, Block, PrefixStore, backend_store
from backends.plan import DecodingPlan
from backends.types import ValidationError

MEMORY_KEY = "chunk_cache"
SEPARATORS = {"blank_line": "\n\n", "two_blank_lines": "\n\n\n", "line": "\n"}
CHECK_LAYER = 1  # CacheBlend's: the first layer whose K/V depend on the context
SHIFTABLE_ROPE = ("default", "linear", "llama3")  # a position shift is a plain rotation


class ChunkCacheConfig(MethodConfig):
    recompute: float = param(0.15, min=0.0, max=1.0, step=0.01,
                             help="fraction of reused chunk tokens recomputed with full cross-chunk attention "
                                  "(the most deviating on layer 1); 1 = full prefill")
    separator: str = param("blank_line", choices=tuple(SEPARATORS),
                           help="where the prompt is cut into chunks: a blank line, two, or every line break")
    min_chunk_tokens: int = param(16, min=1, max=1024,
                                  help="a shorter chunk is merged with the next one (fewer, longer chunks)")
    budget_mb: float = param(256.0, min=1.0, max=65536.0, step=1.0,
                             help="memory for kept chunk K/V; least recently used chunks go first")


def split_chunks(pieces: list[str], separator: str, min_tokens: int) -> list[int]:
    """Token indices where a chunk starts (after the first): before a token that starts a
    non-blank text when the whitespace before it holds ``separator``. Cutting only there
    keeps a chunk's tokens the same wherever it stands: byte-level BPE splits whitespace
    from the word that follows, so a chunk's tokens depend only on its own text."""
    cuts, run, start = [], "", 0
    for index, piece in enumerate(pieces):
        if piece[:1] and not piece[:1].isspace() and separator in run and index - start >= min_tokens:
            cuts.append(index)
            start = index
        run = run + piece if not piece.strip() else piece[len(piece.rstrip()):]
    return cuts


def weights_signature(model: Any) -> str:
    """The parameters as this run holds them (type, dtype, storage): a quantization method
    that swaps weights in gives another signature, so K/V made by other weights never match."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(f"{name}:{type(tensor).__name__}:{tensor.dtype}:{tensor.data_ptr()};".encode())
    return digest.hexdigest()[:16]


def chunk_key(root: str, tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(f"{root}|{','.join(map(str, tokens))}".encode()).hexdigest()[:32]


def chunk_store(backend) -> PrefixStore:
    return backend_store(backend, MEMORY_KEY, "context-chunk reuse")


def check_model(model: Any) -> None:
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise ValidationError("context-chunk reuse needs a Llama-style RoPE decoder (model.model.layers, rotary_emb)")
    rope = getattr(rotary, "rope_type", "default")
    if rope not in SHIFTABLE_ROPE or float(getattr(rotary, "attention_scaling", 1.0) or 1.0) != 1.0:
        raise ValidationError(f"context-chunk reuse cannot move cached keys under '{rope}' RoPE scaling")


@torch.inference_mode()
def prefill_alone(model: Any, tokens: tuple[int, ...], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A chunk's K/V as its own prompt (positions 0..n-1): what is kept and reused."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([tokens], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


class ScatterCache:
    """The whole prompt's K/V per layer; a layer's ``update`` writes the K/V of the tokens
    computed now at their positions and returns every position's (transformers' attention
    calls ``cache.update`` between the projections and the attention)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.rows: torch.Tensor | None = None  # positions of the tokens computed now; None: all

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.rows is None:
            self.keys[layer_idx], self.values[layer_idx] = keys, values
        else:
            self.keys[layer_idx][:, :, self.rows] = keys
            self.values[layer_idx][:, :, self.rows] = values
        return self.keys[layer_idx], self.values[layer_idx]


def rotation(model: Any, deltas: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin that move each key by its ``deltas`` positions (RoPE: a rotation by the delta)."""
    cos, sin = model.model.rotary_emb(torch.empty(0, dtype=dtype, device=deltas.device), position_ids=deltas[None])
    return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def moved_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE keys rotated by the angles of ``cos``/``sin`` (``rotation``): keys made at
    position p become the keys of position p + delta."""
    return torch.addcmul(keys * cos, rotate_half(keys), sin)


def reused_kv(model: Any, chunks: list[Block], offsets: list[int], total: int):
    """Per layer, the kept chunks' K/V concatenated, keys re-rotated by their chunk's offset
    (one rotation per layer for all chunks), padded with zeros to ``total`` positions (the
    suffix's, always recomputed before they are read). Layer 0 and the check layer's values
    are left out (None): ``blended_prefill`` computes them for every token anyway."""
    first = chunks[0].layers[0][0]
    deltas = torch.cat([torch.full((len(b.tokens),), o, device=first.device) for b, o in zip(chunks, offsets)])
    cos, sin = rotation(model, deltas, first.dtype)
    pad = first.new_zeros(*first.shape[:-2], total - len(deltas), first.shape[-1])
    keys: list[torch.Tensor | None] = [None] * min(CHECK_LAYER, len(chunks[0].layers))
    values: list[torch.Tensor | None] = [None] * (CHECK_LAYER + 1)
    for layer in range(len(keys), len(chunks[0].layers)):
        k = torch.cat([b.layers[layer][0] for b in chunks], dim=-2)
        keys.append(torch.cat([moved_keys(k, cos, sin), pad], dim=-2))
        if layer > CHECK_LAYER:
            values.append(torch.cat([*(b.layers[layer][1] for b in chunks), pad], dim=-2))
    return keys, values[:len(keys)]


class _KeysReady(Exception):
    """Raised by ``KeysOnly.update``: the layer's K/V are made, the rest is not needed."""


class KeysOnly:
    """A cache that keeps what a layer hands it and stops the layer there."""

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        self.keys, self.values = keys, values
        raise _KeysReady


def layer_kv(layer: Any, hidden: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Every token's K/V on ``layer`` without its attention and MLP (the check layer only
    needs those): the layer runs until it hands its K/V to the cache, which stops it. One
    generic way for any attention module that calls ``cache.update``."""
    holder = KeysOnly()
    try:
        layer(hidden, attention_mask=None, position_ids=positions, cache=holder, position_embeddings=(cos, sin))
    except _KeysReady:
        return holder.keys, holder.values
    raise ValidationError("context-chunk reuse needs a decoder layer that writes its K/V to the cache")


def position_mask(rows: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: the token at position ``rows[i]`` sees positions 0..rows[i]."""
    visible = torch.arange(total, device=rows.device)[None, :] <= rows[:, None]
    return torch.zeros(visible.shape, dtype=dtype, device=rows.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[None, None]


def deviating_tokens(new_keys: torch.Tensor, old_keys: torch.Tensor, chunk_tokens: int, count: int) -> torch.Tensor:
    """The ``count`` chunk positions whose keys moved most, relative to their size (squared
    change over squared norm, summed over heads). CacheBlend ranks by the absolute K/V
    deviation; on the bundled model that ranking is led by a few large-norm tokens (each
    chunk's first ones, which its own prefill made attention sinks), and the relative
    deviation kept the output closer to full prefill. Over 6 chunk orders x 3 questions (16
    new tokens; ``tests/test_text_context.py``'s documents): recompute 0.15 kept the first
    token right on 16 of 18 prompts and 10.5 tokens before the first divergence, against
    15/18 and 9.2 for the absolute deviation and 15/18 and 9.1 with nothing recomputed;
    recompute 0.3: 18/18 and 13.6, against 17/18 and 12.2."""
    change = (new_keys - old_keys).float().pow(2).sum(dim=(0, 1, 3))
    size = old_keys.float().pow(2).sum(dim=(0, 1, 3)).clamp_min(1e-12)
    return (change / size)[:chunk_tokens].topk(count).indices


@torch.inference_mode()
def blended_prefill(model: Any, ids: torch.Tensor, chunks: list[Block], recompute: float) -> tuple[Any, int]:
    """The K/V of ``ids`` (the prompt less its last token): the chunks' kept K/V; layer 0
    over every token, the check layer's K/V for every token, and the deviating
    ``recompute`` fraction of chunk tokens with every suffix token through the layers from
    the check layer on. Returns a transformers ``DynamicCache`` and how many tokens went
    through those layers (all of them when nothing is left out: full prefill)."""
    from transformers import DynamicCache

    inner = model.model
    total = ids.shape[-1]
    offsets, at = [], 0
    for block in chunks:
        offsets.append(at)
        at += len(block.tokens)
    chunk_tokens = at
    keys, values = reused_kv(model, chunks, offsets, total)
    scatter = ScatterCache(keys, values)
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(total, device=ids.device)[None]
    cos, sin = inner.rotary_emb(hidden, positions)
    rows = positions[0]
    # every token, causal: sdpa's own causal path (as a plain prefill runs it), else a mask
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    mask = None if sdpa else position_mask(rows, total, hidden.dtype)
    layers = list(inner.layers)
    count = round(recompute * chunk_tokens)
    for index, layer in enumerate(layers):
        if index == CHECK_LAYER and count < chunk_tokens:
            reused = keys[index]
            keys[index], values[index] = layer_kv(layer, hidden, positions, cos, sin)
            picked = deviating_tokens(keys[index], reused, chunk_tokens, count)
            rows = torch.cat([picked.sort().values, torch.arange(chunk_tokens, total, device=ids.device)])
            if not len(rows):
                break
            hidden, cos, sin = hidden[:, rows], cos[:, rows], sin[:, rows]
            scatter.rows = rows
            mask = position_mask(rows, total, hidden.dtype)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions[:, rows], cache=scatter,
                       position_embeddings=(cos, sin))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    cache = DynamicCache(config=model.config)
    for index in range(len(layers)):
        cache.update(scatter.keys[index], scatter.values[index], index)
    return cache, len(rows)


@register
class ChunkCacheMethod(Method):
    spec = MethodSpec(
        name="chunk_cache",
        title="Context-chunk reuse (CacheBlend)",
        modalities=("text",),
        families=("causal-lm",),
        summary="Keeps the K/V of prompt chunks (blank-line separated documents) across runs and reuses them in "
                "any order, re-rotated to their place; a few deviating tokens are recomputed to restore "
                "cross-chunk attention. Lossy; faster time to first token on long multi-chunk prompts.",
        paper="Yao et al. 2024, CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge "
              "Fusion (EuroSys 2025)",
        lossless=False,
        config=ChunkCacheConfig,
        slots=("decoder",),
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        check_model(backend.model)
        config = self.config
        store = chunk_store(backend)
        budget = int(config.budget_mb * MB)
        store.shrink(budget)
        run: dict[str, Any] = {}

        def decode(b, input_ids, state) -> None:
            """Split, look up, compute what is missing and blend, inside the timed decoding:
            the time to first token includes all of it."""
            tokens = input_ids[0].tolist()
            chunks = self.chunks_of(b, store, tokens, run)
            if chunks:
                length = sum(len(c.tokens) for c in chunks)
                cache, recomputed = blended_prefill(b.model, input_ids[:, :-1], chunks, config.recompute)
                run.update(recomputed_tokens=recomputed - (len(tokens) - 1 - length),
                           suffix_tokens=len(tokens) - length)
                plan.kwargs["past_key_values"] = cache
            try:
                b._hf_generate(plan, state)
            finally:
                plan.kwargs.pop("past_key_values", None)
            store.shrink(budget)

        set_decoder(plan, decode, "context-chunk reuse")
        return DecodingHandle(plan, lambda: {
            **run, "store_chunks": len(store.blocks), "store_mb": round(store.nbytes / MB, 3),
            "evictions": store.evictions,
        }, self.notes)

    def chunks_of(self, backend, store: PrefixStore, tokens: list[int], run: dict[str, Any]) -> list[Block]:
        """The prompt's chunks before its suffix, kept or computed now (and kept)."""
        config = self.config
        pieces = backend.tokenizer.batch_decode([[t] for t in tokens])
        cuts = split_chunks(pieces, SEPARATORS[config.separator], config.min_chunk_tokens)
        bounds = list(zip([0, *cuts[:-1]], cuts))
        run.update(prompt_tokens=len(tokens), chunks=len(bounds), chunks_reused=0, chunks_computed=0,
                   reused_tokens=0, recomputed_tokens=0, suffix_tokens=len(tokens))
        if not bounds:
            return []
        root = f"{store.fingerprint}:{weights_signature(backend.model)}"
        chunks = []
        for start, stop in bounds:
            piece = tuple(tokens[start:stop])
            key = chunk_key(root, piece)
            block = store.blocks.get(key)
            if block is None:
                block = Block(key, root, piece, prefill_alone(backend.model, piece, backend.device))
                store.add(block)
                store.misses += 1
                run["chunks_computed"] += 1
            else:
                store.touch(key)
                store.hits += 1
                run["chunks_reused"] += 1
                run["reused_tokens"] += len(piece)
            chunks.append(block)
        return chunks

    def notes(self, plan: DecodingPlan) -> list[str]:
        if self.config.recompute >= 1.0:
            return ["recompute 1: every token is recomputed, which is full prefill (nothing is saved)"]
        return []
