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
    for the prefix, the generation embeddings and head for image tokens).

    ``forward(tokens, positions=None, mask=None)`` appends ``tokens`` to the cache and
    returns the sampling distribution after each of them (float32, on the CPU); ``crop(n)`` keeps the first
    ``n`` cached tokens (speculative loops drop rejected drafts). ``forwards`` counts
    transformer calls, the work the parallel loops save.
    """

    def __init__(self, pipe: Any, prompt: str, sampling: ARSampling, seed: int, device: torch.device | None = None):
        from transformers import DynamicCache

        self.pipe = pipe
        self.layout = pipe.layout
        self.prompt = prompt
        self.sampling = sampling
        self.device = device or next(pipe.transformer.parameters()).device
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        rows = [self.layout.prompt_ids(prompt)]
        if sampling.uses_cfg:  # the null row has the prompt row's length (Janus: its own pads)
            rows.append(self.layout.null_ids(rows[0]))
        self.prefix = torch.tensor(rows, device=self.device)
        self.cache = DynamicCache()
        self.static = False  # a preallocated StaticCache (``use_static_cache``)
        self.forwards = 0
        self.cached = 0  # tokens in the cache

    def companion(self, pipe: Any) -> "ARSession":
        """A session of another model of the same layout (a draft) on this request, drawing
        from this session's generator: one seed, one stream of randomness for the whole loop."""
        other = ARSession(pipe, self.prompt, self.sampling, 0, self.device)
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
                                 max_cache_len=self.prefix.shape[1] + self.n_tokens)
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
        return self._run(self.prefix, None, None, prefix=True)[-1]

    @torch.no_grad()
    def forward(self, tokens: list[int], positions: list[int] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens at raster ``positions`` (default: right after the cache) -> (len, V).

        ``mask``: (len, cached + len) booleans, True where a query may attend (default causal)."""
        ids = torch.tensor([tokens], device=self.device).expand(self.prefix.shape[0], -1)
        return self._run(ids, positions, mask)

    def _run(self, ids: torch.Tensor, positions: list[int] | None, mask: torch.Tensor | None,
             prefix: bool = False) -> torch.Tensor:
        n = ids.shape[1]
        if positions is None:
            pos = torch.arange(self.cached, self.cached + n, device=self.device)
        else:
            pos = torch.tensor(positions, device=self.device) + self.prefix.shape[1]
        attention_mask = None
        kwargs: dict[str, Any] = {}
        if self.static:  # where to write in the preallocated cache: the next free slots
            kwargs["cache_position"] = torch.arange(self.cached, self.cached + n, device=self.device)
        if mask is not None:  # a 4-D additive mask: transformers uses it as given
            additive = torch.zeros(mask.shape, dtype=self.pipe.transformer.dtype, device=self.device)
            additive.masked_fill_(~mask.to(self.device), torch.finfo(additive.dtype).min)
            attention_mask = additive[None, None].expand(ids.shape[0], 1, -1, -1)
        logits = self.pipe.token_logits(ids, pos[None].expand(ids.shape[0], -1), self.cache, attention_mask,
                                        prefix=prefix, **kwargs)
        self.forwards += 1
        self.cached += n
        # on the CPU whatever the model's device: the loops draw with the CPU generator (a
        # seed is one image on every device) and mix in CPU tensors (sjd's q, the neighbours)
        return self.sampling.probs(logits).float().cpu()

    def crop(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (prefix included)."""
        from backends.accel._decoding import crop_cache

        if self.static:
            raise RuntimeError("a static cache cannot be cropped")

        crop_cache(self.cache, n)
        self.cached = n


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
