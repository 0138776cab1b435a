"""The tokenizer every bundled diffusion recipe builds for its closed prompt vocabulary."""

from __future__ import annotations


def build_word_tokenizer(words, max_tokens: int, tries: int = 30):
    """A ``CLIPTokenizer`` whose BPE merges spell each of ``words`` as one token.

    Merges are chains (c+i, ci+r, ...). Where one word's merge would split another word
    (``r i`` from "right" inside "triangle"), that word's chain moves to the front until
    every word is a single token. Deterministic: the same words give the same files.
    """
    from transformers import CLIPTokenizer

    words = list(words)
    chars = sorted({c for w in words for c in w})
    order, bad = list(words), []
    for _ in range(tries):
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for c in chars:
            vocab.setdefault(c, len(vocab))
            vocab.setdefault(c + "</w>", len(vocab))
        merges: list[tuple[str, str]] = []
        for w in order:
            sym = list(w[:-1]) + [w[-1] + "</w>"]
            cur = sym[0]
            for s in sym[1:]:
                if (cur, s) not in merges:
                    merges.append((cur, s))
                cur += s
                vocab.setdefault(cur, len(vocab))
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)
        bad = [w for w in words if len(tok.tokenize(w)) != 1]
        if not bad:
            return tok
        order = bad + [w for w in order if w not in bad]
    raise RuntimeError(f"could not make single-token merges for {bad}")
