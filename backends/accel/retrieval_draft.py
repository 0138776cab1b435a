"""Retrieval drafting from a datastore (He et al. 2024, "REST: Retrieval-Based Speculative
Decoding"; CodeSwift, 2025, multi-source retrieval drafts for code): the continuations of
the current context's last n-gram in a code corpus become a draft tree.

The datastore is a code corpus tokenized with the model's own tokenizer: by default the
corpus the bundled code model learned from, Python's standard library source
(``sysconfig.get_paths()['stdlib']``, tests excluded), capped at ``corpus_tokens``. Its
index is a hashed n-gram table per n (the n-gram's rolling hash, sorted, with the positions
that start it; numpy), built once per tokenizer and size and cached on disk in the data
dir's ``cache/retrieval/`` folder. Each step looks up the longest of the last
``max_ngram``..2 tokens that occurs, reads up to ``depth`` tokens after (a sample of) its
occurrences, merges them into a trie and keeps the ``tree_size`` most frequent nodes (REST's
selection); with ``context`` on, the request's own tokens are a second source (CodeSwift's
multi-source retrieval: code repeats its own identifiers). The tree is verified in one
forward with tree attention (``backends.accel._tree_decoding``): exact greedy output.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodingHandle, require_greedy, set_decoder
from backends.accel._tree_decoding import TreeStats, tree_decode
from backends.accel.lookahead import candidate_tree
from backends.accel.prefix_cache import cache_root
from backends.plan import DecodingPlan
from backends.types import ValidationError

BASE = np.uint64(1_000_003)  # the rolling hash's multiplier (mod 2**64, numpy's wrap-around)
INDEX_VERSION = 1


class RetrievalDraftConfig(MethodConfig):
    corpus_tokens: int = param(1_000_000, min=10_000, max=8_000_000,
                               help="datastore size in tokens (stdlib source; built once, cached on disk; "
                                    "~24 bytes a token with its index)")
    max_ngram: int = param(4, min=2, max=8, help="longest context suffix looked up (then shorter ones, down to 2)")
    depth: int = param(6, min=1, max=16, help="tokens read after each occurrence (longest draft path)")
    tree_size: int = param(12, min=1, max=128, paper=64,
                           help="draft tokens per forward: the most frequent trie nodes (CPU: 8-16; GPU: ~64)")
    max_matches: int = param(256, min=1, max=10_000, help="occurrences read per lookup (a sample of them)")
    context: bool = param(True, help="also retrieve from the request's own tokens (prompt and output so far)")


def rolling_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram of ``tokens`` (position i: tokens[i:i+n])."""
    count = len(tokens) - n + 1
    hashes = np.zeros(max(count, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            hashes = hashes * BASE + tokens[j:j + count].astype(np.uint64)
    return hashes


def hash_of(ngram: list[int]) -> np.uint64:
    return rolling_hashes(np.asarray(ngram, dtype=np.int64), len(ngram))[0]


@dataclass
class Datastore:
    """A token corpus and, per n-gram size, its sorted n-gram hashes with their positions."""

    tokens: np.ndarray
    tables: dict[int, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + sum(h.nbytes + p.nbytes for h, p in self.tables.values())

    @classmethod
    def build(cls, tokens: np.ndarray, sizes: range) -> "Datastore":
        tables = {}
        for n in sizes:
            hashes = rolling_hashes(tokens, n)
            order = np.argsort(hashes, kind="stable").astype(np.int32)
            tables[n] = (hashes[order], order)
        return cls(tokens, tables)

    def occurrences(self, ngram: list[int], limit: int) -> np.ndarray:
        """Start positions of ``ngram`` in the corpus (hash collisions removed), at most
        ``limit``, spread over all occurrences."""
        n = len(ngram)
        hashes, positions = self.tables[n]
        key = hash_of(ngram)
        lo, hi = np.searchsorted(hashes, key, "left"), np.searchsorted(hashes, key, "right")
        if hi <= lo:
            return positions[:0]
        found = positions[lo:hi]
        if len(found) > limit:
            found = found[np.linspace(0, len(found) - 1, limit).astype(np.int64)]
        window = self.tokens[found[:, None] + np.arange(n)[None, :]]
        return found[(window == np.asarray(ngram)[None, :]).all(axis=1)]

    def continuations(self, context: list[int], max_ngram: int, depth: int, limit: int) -> list[tuple[int, ...]]:
        """What followed the longest context suffix found (``max_ngram`` down to 2 tokens)."""
        for n in range(min(max_ngram, len(context)), 1, -1):
            if n not in self.tables:
                continue
            found = self.occurrences(context[-n:], limit)
            found = found[found + n < len(self.tokens)]
            if len(found):
                end = np.minimum(found + n + depth, len(self.tokens))
                return [tuple(self.tokens[s + n:e].tolist()) for s, e in zip(found, end)]
        return []


def stdlib_corpus_text(limit_chars: int) -> list[str]:
    """The bundled code model's training files (stdlib source, tests excluded), in order,
    up to about ``limit_chars`` characters."""
    from backends.tiny.text_models import read_text, stdlib_files

    texts, total = [], 0
    for path in stdlib_files()[0]:
        text = read_text(path)
        texts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return texts


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


def load_datastore(backend, corpus_tokens: int, max_ngram: int) -> tuple[Datastore, str]:
    """The backend's datastore for this size and where it came from ("memory", "disk" or
    "built": tokenizing the corpus, then cached on disk). Kept in the backend's run memory."""
    memory = getattr(backend, "run_memory", None)
    if memory is None:
        raise ValidationError("retrieval drafting needs a text backend that keeps state across runs")
    key = ("retrieval_draft", corpus_tokens, max_ngram)
    if key in memory:
        return memory[key], "memory"
    for old in [k for k in memory if isinstance(k, tuple) and k and k[0] == "retrieval_draft"]:
        del memory[old]  # one datastore per model in memory
    folder = cache_root(backend) / "retrieval"
    path = folder / f"stdlib-{tokenizer_fingerprint(backend.tokenizer)}-{corpus_tokens}-n{max_ngram}" \
                    f"-v{INDEX_VERSION}.npz"
    store, source = _read(path, max_ngram), "disk"
    if store is None:
        tokens = _tokenize_corpus(backend.tokenizer, corpus_tokens)
        store, source = Datastore.build(tokens, range(2, max_ngram + 1)), "built"
        _write(path, store)
    memory[key] = store
    return store, source


def _tokenize_corpus(tokenizer, corpus_tokens: int) -> np.ndarray:
    texts = stdlib_corpus_text(corpus_tokens * 4)  # ~3 characters a token on code, with margin
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False).input_ids:
        ids.extend(encoded)
        if len(ids) >= corpus_tokens:
            break
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.int32
    return np.asarray(ids[:corpus_tokens], dtype=dtype).astype(np.int64)


def _read(path: Path, max_ngram: int) -> Datastore | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            tokens = data["tokens"].astype(np.int64)
            tables = {n: (data[f"h{n}"], data[f"p{n}"]) for n in range(2, max_ngram + 1)}
        return Datastore(tokens, tables)
    except Exception:  # a half-written or older file: rebuilt
        return None


def _write(path: Path, store: Datastore) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    small = store.tokens.astype(np.uint16) if store.tokens.max(initial=0) < 65535 else store.tokens.astype(np.int32)
    arrays = {"tokens": small}
    for n, (hashes, positions) in store.tables.items():
        arrays[f"h{n}"], arrays[f"p{n}"] = hashes, positions
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, **arrays)
    temporary.replace(path)


def context_continuations(sequence: list[int], max_ngram: int, depth: int, limit: int = 8) -> list[tuple[int, ...]]:
    """What followed earlier occurrences of the sequence's last n-gram in the sequence
    itself (the latest ``limit``), longest n first."""
    for n in range(min(max_ngram, len(sequence) - 1), 1, -1):
        tail = sequence[-n:]
        found = []
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start:start + n] == tail:
                found.append(tuple(sequence[start + n:start + n + depth]))
                if len(found) >= limit:
                    break
        if found:
            return found
    return []


def select_tree(continuations: list[tuple[int, ...]], size: int):
    """REST's trie selection: the ``size`` prefixes shared by most continuations (a
    parent is at least as frequent as its children and shorter, so it comes first)."""
    counts = Counter(c[:i] for c in continuations for i in range(1, len(c) + 1))
    chosen = [p for p, _ in sorted(counts.items(), key=lambda item: (-item[1], len(item[0]), item[0]))[:size]]
    inner = {p[:i] for p in chosen for i in range(1, len(p))}
    return candidate_tree([p for p in chosen if p not in inner])  # the merge rebuilds the shared prefixes


@register
class RetrievalDraftMethod(Method):
    spec = MethodSpec(
        name="retrieval_draft",
        title="Retrieval drafting (datastore)",
        modalities=("text",),
        families=("causal-lm",),
        summary="Drafts the continuations of the context's last n-gram in a code corpus (stdlib source, indexed "
                "once and cached on disk), verified as a tree in one forward; exact greedy output.",
        paper="He et al. 2024, REST: Retrieval-Based Speculative Decoding (NAACL); CodeSwift 2025, multi-source "
              "retrieval drafting for code generation",
        lossless=True,
        config=RetrievalDraftConfig,
        slots=("decoder",),
        defaults_note="a small tree measured on one CPU thread; the papers' larger trees suit a GPU",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """A tree holds at least one full path: tree_size >= depth (any model)."""
        return Limits(ranges={"tree_size": ("depth", None)})

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        require_greedy(plan, "retrieval drafting")
        config = self.config
        store, source = load_datastore(backend, config.corpus_tokens, config.max_ngram)
        run = TreeStats()
        sources = Counter()

        def propose(sequence: list[int], _current: int):
            found = store.continuations(sequence, config.max_ngram, config.depth, config.max_matches)
            if config.context:
                own = context_continuations(sequence, config.max_ngram, config.depth)
                sources["context"] += bool(own)
                found = own * 4 + found  # the request's own text weighs more than the corpus
            return select_tree([c for c in found if c], config.tree_size)

        set_decoder(plan, lambda b, ids, state: tree_decode(b, ids, state, propose, run), "retrieval drafting")

        def stats() -> dict[str, Any]:
            return {**run.as_dict(), "datastore": source, "datastore_tokens": int(len(store.tokens)),
                    "datastore_mb": round(store.nbytes / (1 << 20), 1), "steps_with_context_match": sources["context"]}

        notes = [f"the {config.corpus_tokens:,}-token datastore was built in this run (then cached on disk): this "
                 "run's time includes tokenizing and indexing the corpus"] if source == "built" else []
        return DecodingHandle(plan, stats, lambda _plan: notes)
