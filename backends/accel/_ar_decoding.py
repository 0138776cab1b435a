"""The decoding loops of autoregressive image models (``backends/ar_image.py``): plain
next-token sampling and the parallel loops the AR-image methods plug in.

An AR image model writes a grid of codebook tokens in raster order after a prompt prefix;
``ARSession`` runs its transformer with classifier-free guidance (the cond and null-prompt
rows as one batch of 2, as LlamaGen does) over a KV cache, counts the forwards and turns
the two rows' logits into the sampling distribution: ``u + s (c - u)`` over the image
codes, divided by the temperature, top-k filtered, softmaxed (temperature 0 = one-hot on
the argmax). Every loop draws its randomness from one ``torch.Generator`` seeded with the
request's seed, so a seed means one image for each loop.

A loop is ``loop(session, progress) -> tokens (1, N)``; the backend's plan holds the loop
(``ARImagePlan.decoder``) and a method replaces it, as the text methods replace ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ARSampling:
    """How tokens are drawn: CFG scale, temperature (0 = greedy) and top-k (0 = all codes)."""

    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int = 0

    @property
    def uses_cfg(self) -> bool:
        """Guidance above 1 only, as transformers applies CFG and as the Image tab says ("1 or
        less runs one pass"): below 1 the mix would push away from the prompt, at 0 drop it."""
        return self.guidance > 1.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (rows, n, V) of the cond [and uncond] rows -> probabilities (n, V)."""
        logits = logits.float()
        mixed = logits[1] + self.guidance * (logits[0] - logits[1]) if self.uses_cfg else logits[0]
        if self.temperature <= 0:
            return torch.nn.functional.one_hot(mixed.argmax(-1), mixed.shape[-1]).float()
        mixed = mixed / self.temperature
        if 0 < self.top_k < mixed.shape[-1]:
            kth = mixed.topk(self.top_k, dim=-1).values[..., -1:]
            mixed = mixed.masked_fill(mixed < kth, float("-inf"))
        return mixed.softmax(-1)


def draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from ``probs`` (V,) with ``gen``."""
    return int(torch.multinomial(probs, 1, generator=gen))


def uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


class ARSession:
    """One image being written: the pipeline, the prompt prefix, the KV cache, the counters.

    The pipeline is any object with ``layout`` (``prompt_ids(prompt)``, ``null_ids(prompt_ids)``,
    ``image_tokens``, ``codebook_size``, ``grid``), ``transformer`` (a module: device, dtype)
    and ``token_logits(ids, position_ids, cache, attention_mask, prefix)`` -> logits over
    the image codes (rows, n, codebook_size): the bundled ``ARImagePipeline`` (one Llama
    over one vocabulary) or a hub model's adapter (``backends/janus.py``: text embeddings
    for the prefix, the generation embeddings and head for image tokens; ``backends/emu3.py``).

    ``forward(tokens, positions=None, mask=None)`` appends ``tokens`` to the cache and
    returns the sampling distribution after each of them (float32, on the CPU); ``crop(n)``
    keeps the first ``n`` cache entries (speculative loops drop rejected drafts). ``forwards`` counts
    transformer calls, the work the parallel loops save.

    The loops speak of the grid only: raster positions, one cache entry per token, masks
    over tokens. Two things a hub model may need are mapped here, so that every loop runs
    unchanged: (1) a model that writes tokens of its own between grid tokens (Emu3: an
    end-of-line after each row) has a layout with ``fillers``/``sequence_offset``/``input_id``;
    a token is fed with its fillers, placed at its sequence position, counted as one cache
    entry of 1 + fillers tokens, read off its last filler's output, and a mask over tokens is
    widened over the fillers (``_sequence``, ``_expand_mask``); (2) guidance rows of different
    lengths (Emu3's negative prompt) are left-padded, each row's positions start at its first
    real token and the pads are hidden from every query. For the bundled model and Janus
    (no fillers, rows of one length) both are the identity: the same calls as before.
    """

    def __init__(self, pipe: Any, prompt: str, sampling: ARSampling, seed: int, device: torch.device | None = None,
                 negative_prompt: str | None = None):
        from transformers import DynamicCache

        self.pipe = pipe
        self.layout = pipe.layout
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.sampling = sampling
        self.device = device or next(pipe.transformer.parameters()).device
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        rows = [self.layout.prompt_ids(prompt)]
        if sampling.uses_cfg:  # Janus: the prompt's length, its own pads; Emu3: a negative prompt's own length
            rows.append(_null_row(self.layout, rows[0], negative_prompt))
        width = max(len(row) for row in rows)
        # rows of different lengths are left-padded; the pads are hidden from every query
        self.pads = [width - len(row) for row in rows]
        pad_id = getattr(self.layout, "pad_id", 0)
        self.prefix = torch.tensor([[pad_id] * pad + row for pad, row in zip(self.pads, rows)], device=self.device)
        self.cache = DynamicCache()
        self.static = False  # a preallocated StaticCache (``use_static_cache``)
        self.forwards = 0
        self.cached = 0  # entries in the cache: prefix tokens and image tokens (an image token's fillers included)
        self._spans: list[int] = []  # sequence tokens each cached entry holds (1, or 1 + its fillers)
        self._ends: list[int] = []  # the cache's sequence length after each entry (crop reads it)

    def companion(self, pipe: Any) -> "ARSession":
        """A session of another model of the same layout (a draft) on this request, drawing
        from this session's generator: one seed, one stream of randomness for the whole loop."""
        other = ARSession(pipe, self.prompt, self.sampling, 0, self.device, negative_prompt=self.negative_prompt)
        other.gen = self.gen
        return other

    def use_static_cache(self) -> None:
        """Hold K/V in a transformers ``StaticCache`` allocated once at prefix + image tokens
        (the ``static_cache`` method), before the first forward. Only for loops that never
        crop: a static cache has no shorter length to go back to."""
        from transformers import StaticCache

        if self.cached:
            raise RuntimeError("the static cache must be set before the first forward")
        self.cache = StaticCache(config=self.pipe.static_cache_config(),
                                 max_cache_len=self.prefix.shape[1] + _grid_sequence_length(self.layout))
        self.static = True

    @property
    def n_tokens(self) -> int:
        return self.layout.image_tokens

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Run the prompt prefix; the distribution of the first image token (V,)."""
        n = self.prefix.shape[1]
        positions = torch.arange(n, device=self.device)
        mask = None
        if any(self.pads):
            mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        return self._run(self.prefix, positions, mask, [1] * n, prefix=True)[-1]

    @torch.no_grad()
    def forward(self, tokens: list[int], positions: list[int] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens at raster ``positions`` (default: right after the cache) -> (len, V).

        ``mask``: (len, cached + len) booleans, True where a query may attend (default causal)."""
        start = self.cached - self.prefix.shape[1]  # raster position after the cache (plain and Jacobi loops)
        raster = positions if positions is not None else list(range(start, start + len(tokens)))
        ids, offsets, spans = _sequence(self.layout, tokens, raster)
        seq_pos = torch.tensor(offsets, device=self.device) + self.prefix.shape[1]
        if mask is not None:
            mask = mask.to(self.device)
            if hasattr(self.layout, "fillers"):
                mask = _expand_mask(mask, self._spans, spans)
        elif any(self.pads):
            n, keys = len(ids), self._sequence_length(self.cached) + len(ids)
            mask = torch.ones(n, keys, dtype=torch.bool, device=self.device).tril(keys - n)
        rows = self.prefix.shape[0]
        probs = self._run(torch.tensor([ids], device=self.device).expand(rows, -1), seq_pos, mask, spans)
        last = torch.tensor(spans).cumsum(0) - 1  # each token's last sequence entry: its distribution
        return probs[last.to(probs.device)] if len(ids) != len(tokens) else probs

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, spans: list[int],
             prefix: bool = False) -> torch.Tensor:
        rows = ids.shape[0]
        pads = torch.tensor(self.pads, device=self.device)
        pos = (positions[None] - pads[:, None]).clamp_min(0) if any(self.pads) else positions[None].expand(rows, -1)
        attention_mask = None
        kwargs: dict[str, Any] = {}
        if self.static:  # where to write in the preallocated cache: the next free slots
            written = self._sequence_length(self.cached)
            kwargs["cache_position"] = torch.arange(written, written + ids.shape[1], device=self.device)
        if mask is not None:  # a 4-D additive mask: transformers uses it as given
            if any(self.pads):
                mask = self._hide_pads(mask, prefix)
            additive = torch.zeros(mask.shape, dtype=self.pipe.transformer.dtype, device=self.device)
            additive.masked_fill_(~mask, torch.finfo(additive.dtype).min)
            attention_mask = additive[None, None].expand(rows, 1, -1, -1) if additive.dim() == 2 else additive[:, None]
        logits = self.pipe.token_logits(ids, pos, self.cache, attention_mask, prefix=prefix, **kwargs)
        self.forwards += 1
        self.cached += len(spans)
        self._spans += spans
        for span in spans:
            self._ends.append(self._sequence_length(len(self._ends)) + span)
        # on the CPU whatever the model's device: the loops draw with the CPU generator (a
        # seed is one image on every device) and mix in CPU tensors (sjd's q, the neighbours)
        return self.sampling.probs(logits).float().cpu()

    def _hide_pads(self, mask: torch.Tensor, prefix: bool) -> torch.Tensor:
        """(n, keys) -> (rows, n, keys): a padded row's pads are seen by no query but themselves."""
        mask = mask[None].expand(len(self.pads), -1, -1).clone()
        for row, pad in enumerate(self.pads):
            mask[row, :, :pad] = False
            if prefix and pad:
                mask[row, :pad, :pad] = torch.eye(pad, dtype=torch.bool, device=self.device)
        return mask

    def crop(self, n: int) -> None:
        """Keep the first ``n`` cached entries (prefix included; an image token with its fillers)."""
        from backends.accel._decoding import crop_cache

        if self.static:
            raise RuntimeError("a static cache cannot be cropped")

        crop_cache(self.cache, self._sequence_length(n))
        del self._spans[n:], self._ends[n:]
        self.cached = n

    def _sequence_length(self, entries: int) -> int:
        """Sequence tokens in the first ``entries`` cache entries."""
        return self._ends[entries - 1] if entries else 0


def _null_row(layout: Any, prompt_ids: list[int], negative_prompt: str | None) -> list[int]:
    """The guidance row: a negative prompt's ids where the layout reads one (Emu3), else the
    layout's null row for the prompt (the bundled model's, Janus's pads)."""
    if negative_prompt and hasattr(layout, "negative_ids"):
        return layout.negative_ids(negative_prompt)
    return layout.null_ids(prompt_ids)


def _grid_sequence_length(layout: Any) -> int:
    """Sequence tokens of the whole grid: the image tokens, plus the fillers between them."""
    last = layout.image_tokens - 1
    if not hasattr(layout, "fillers"):
        return layout.image_tokens
    return layout.sequence_offset(last) + 1 + len(layout.fillers(last))


def _sequence(layout: Any, tokens: list[int], raster: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Image tokens at raster positions -> (input ids, sequence offsets after the prefix, entries per token).

    A layout whose model writes tokens of its own between grid tokens (Emu3: an end-of-line
    after each row) names them with ``fillers(p)`` (what follows raster position ``p``), places
    a grid token with ``sequence_offset(p)`` and gives the model's own id of a code with
    ``input_id(code)``; the others (the bundled model, Janus) feed codes at their raster positions."""
    fillers = getattr(layout, "fillers", None)
    if fillers is None:
        return list(tokens), list(raster), [1] * len(tokens)
    ids, offsets, spans = [], [], []
    for token, p in zip(tokens, raster):
        after = fillers(p)
        start = layout.sequence_offset(p)
        ids += [layout.input_id(token)] + list(after)
        offsets += list(range(start, start + 1 + len(after)))
        spans.append(1 + len(after))
    return ids, offsets, spans


def _expand_mask(mask: torch.Tensor, cached_spans: list[int], spans: list[int]) -> torch.Tensor:
    """A (tokens, cached + tokens) mask over grid tokens -> the same over sequence entries: an
    entry's fillers are seen where it is seen; a fed token's fillers see what it sees, and within
    its own group each entry sees the ones before it (causal)."""
    if all(s == 1 for s in spans) and all(s == 1 for s in cached_spans):
        return mask
    key_spans = torch.tensor(cached_spans + spans, device=mask.device)
    query_spans = torch.tensor(spans, device=mask.device)
    out = mask.repeat_interleave(key_spans, dim=1).repeat_interleave(query_spans, dim=0)
    first_key = sum(cached_spans)
    row = 0
    for span in spans:
        own = torch.ones(span, span, dtype=torch.bool, device=mask.device).tril()
        out[row:row + span, first_key:first_key + span] = own
        first_key += span
        row += span
    return out


def plain_loop(session: ARSession, progress: ProgressFn | None = None) -> torch.Tensor:
    """Next-token sampling, one forward per token: the baseline every method is measured against."""
    probs, tokens = session.prefill(), []
    total = session.n_tokens
    for i in range(total):
        tokens.append(draw(probs, session.gen))
        if progress is not None:
            progress(i + 1, total, "decode")
        if i + 1 < total:
            probs = session.forward([tokens[-1]])[-1]
    return torch.tensor([tokens])


def static_cache_loop(session: ARSession, progress: ProgressFn | None = None) -> torch.Tensor:
    """The plain loop over a preallocated ``StaticCache`` (the ``static_cache`` method): the
    same forwards on the same K/V, written in place instead of concatenated."""
    session.use_static_cache()
    return plain_loop(session, progress)


def sample_plain(pipe: Any, prompt: str, sampling: ARSampling, seed: int) -> tuple[torch.Tensor, int]:
    """(tokens (1, N), forwards) of one plainly sampled image (recipes and tests)."""
    session = ARSession(pipe, prompt, sampling, seed)
    return plain_loop(session), session.forwards


def run_loop(loop: Callable[..., torch.Tensor], pipe: Any, prompt: str, sampling: ARSampling,
             seed: int) -> tuple[torch.Tensor, int]:
    session = ARSession(pipe, prompt, sampling, seed)
    return loop(session, None), session.forwards


def loaded_layout(backend: Any) -> Any | None:
    """The token layout of ``backend``'s loaded AR image model (None: not one, or unloaded):
    where the methods' limits read the codebook size and the grid."""
    return getattr(getattr(backend, "pipe", None), "layout", None)


AR_SLOT = "ar-decoder"  # the token loop of an AR image model: one method replaces it at a time
AR_FAMILY = "ar-image"


def set_ar_decoder(plan: Any, loop: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """Put ``loop`` in ``plan`` in place of the plain one; returns the undo (the handle's remove)."""
    previous = plan.decoder
    plan.decoder = loop

    def undo() -> None:
        plan.decoder = previous

    return undo


@dataclass
class LoopStats:
    """Figures of one run of a parallel loop, reported by the method's handle."""

    forwards: int = 0
    tokens: int = 0
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, accepted

    def as_dict(self) -> dict[str, Any]:
        figures = {
            "transformer_forwards": self.forwards,
            "tokens": self.tokens,
            "tokens_per_forward": round(self.tokens / self.forwards, 3) if self.forwards else 0.0,
        }
        if self.drafted:  # loops that verify drafts (sjd, lantern): the share of verified drafts kept
            figures["draft_acceptance"] = round(self.accepted / self.drafted, 3)
        return figures
