"""Text generation with a causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``).

The decoding seam
-----------------
``build_call`` turns a request into a plain dict, and acceleration methods edit that
dict in ``prepare_call``. Two keys decide how tokens are produced:

``generate_kwargs``
    Keyword arguments for transformers' ``model.generate`` on top of a fresh
    ``GenerationConfig`` (so a model's own generation_config.json never changes what
    "plain greedy" means). Library-backed methods only add keys here:
    ``assistant_model`` (speculative), ``prompt_lookup_num_tokens`` (prompt lookup),
    ``cache_implementation`` (static cache).
``decoder``
    ``None`` (use ``model.generate``) or a function ``decoder(backend, input_ids, state)``
    that runs its own loop: it calls the model, hands every accepted token to
    ``state.emit(tokens)`` and stops when ``emit`` returns True (budget or EOS reached).
    Lookahead, layer skipping, SnapKV and attention sinks replace the loop this way.
    ``state.sampling.pick(logits)`` draws the next token with the request's sampling
    settings, so a custom loop samples exactly like ``generate`` would.

Both paths stream: ``progress(n_tokens, max_new_tokens, text_so_far)`` is called as
tokens arrive (a transformers ``BaseStreamer`` for ``generate``, ``state.emit`` for
custom loops), and both fill the same figures in ``Result.extra``: tokens generated,
time to first token (= the ``prefill`` stage), tokens/s over the ``decode`` stage, and
target forwards, whose ratio to tokens is the accepted tokens per target forward that
speculative methods live on (1.0 for plain decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backends.base import Backend, ProgressFn, module_bytes
from backends.catalog import find_bundled, resolve_source
from backends.timing import StageTimer
from backends.types import ModelLoadError, Request, StudioError, ValidationError

DEFAULT_MAX_NEW_TOKENS = 128
Decoder = Callable[["TextBackend", torch.Tensor, "DecodeState"], None]


def load_causal_lm(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The one loading path for targets and drafts: tokenizer + model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, tokenizer


@dataclass
class Sampling:
    """The request's sampling settings, applied the way ``generate`` applies them
    (temperature, then top-k, then top-p); greedy when ``do_sample`` is False."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(int(self.seed))

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids for ``logits`` of shape (..., vocab)."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / max(self.temperature, 1e-5)
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= 1 - self.top_p
            drop_sorted[..., -1:] = False
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        picked = torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])
        return picked.to(logits.device)


@dataclass
class DecodeState:
    """Tokens as they are accepted: budget and EOS, streaming, first-token time."""

    max_new_tokens: int
    eos_token_ids: set[int]
    sampling: Sampling
    on_tokens: Callable[[list[int]], None] | None = None
    tokens: list[int] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: bool = False

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def emit(self, new_tokens: list[int] | torch.Tensor) -> bool:
        """Accept tokens in order; returns True once generation must stop."""
        if isinstance(new_tokens, torch.Tensor):
            new_tokens = new_tokens.reshape(-1).tolist()
        taken = []
        for token in new_tokens:
            if self.finished:
                break
            taken.append(int(token))
            if int(token) in self.eos_token_ids or len(self.tokens) + len(taken) >= self.max_new_tokens:
                self.finished = True
        self.record(taken)
        return self.finished

    def record(self, taken: list[int]) -> None:
        if not taken:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(taken)
        if self.on_tokens is not None:
            self.on_tokens(list(self.tokens))


def _make_streamer(state: DecodeState):
    """A transformers streamer feeding ``state`` (the first ``put`` is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class _Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            state.record([int(t) for t in value.reshape(-1).tolist()])

        def end(self) -> None:
            pass

    return _Streamer()


class TextBackend(Backend):
    """A causal LM and its tokenizer; drafts for speculative decoding are cached here."""

    modality = "text"

    def __init__(self, model_id: str, model: Any, tokenizer: Any, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, draft_id: str | None = None):
        device = torch.device(device) if device is not None else model.device
        super().__init__(model_id, device, dtype or model.dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.family = "causal-lm"
        self.draft_id = draft_id  # the paired draft ('auto' in the speculative method)
        self.drafts: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "TextBackend":
        model, tokenizer = load_causal_lm(source, device, dtype)
        entry = find_bundled(model_id)
        return cls(model_id, model, tokenizer, device, dtype, draft_id=entry.draft if entry else None)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, model_id: str = "in-memory",
                   drafts: dict[str, tuple[Any, Any]] | None = None, draft_id: str | None = None) -> "TextBackend":
        """An in-memory model (tests, notebooks); ``drafts`` pre-seeds the draft cache."""
        backend = cls(model_id, model, tokenizer, draft_id=draft_id or next(iter(drafts or {}), None))
        backend.drafts.update(drafts or {})
        return backend

    # -- drafts --------------------------------------------------------------------------
    def get_draft(self, draft_id: str) -> tuple[Any, Any]:
        """Load a draft (bundled name, folder or hub id) once, by the manager's path."""
        if draft_id not in self.drafts:
            source = resolve_source(draft_id)
            try:
                self.drafts[draft_id] = load_causal_lm(source, self.device, self.dtype)
            except StudioError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"could not load draft model '{draft_id}': {str(exc)[:300]}") from exc
        return self.drafts[draft_id]

    # -- Backend -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module | None:
        return self.model

    def memory_bytes(self) -> int:
        return module_bytes(self.model, *(m for m, _ in self.drafts.values()))

    def unload(self) -> None:
        self.model = None
        self.drafts.clear()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.model is not None:
            config = self.model.config
            info.update(arch=type(self.model).__name__, layers=getattr(config, "num_hidden_layers", None),
                        vocab=getattr(config, "vocab_size", None), draft=self.draft_id)
        return info

    @property
    def eos_token_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def encode_prompt(self, prompt: str, chat_template: bool = True) -> torch.Tensor:
        if chat_template and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[-1] == 0:
            raise ValidationError("the prompt encodes to no tokens")
        return ids.to(self.device)

    def build_call(self, request: Request) -> dict[str, Any]:
        params = request.params
        max_new_tokens = int(params.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        temperature = float(params.get("temperature") or 0.0)
        do_sample = bool(params.get("do_sample", temperature > 0))
        sampling = Sampling(
            do_sample=do_sample,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=int(params.get("top_k") or 0),
            top_p=float(params.get("top_p") or 1.0),
            seed=int(request.seed),
        )
        input_ids = self.encode_prompt(request.prompt, bool(params.get("chat_template", True)))
        eos = self.eos_token_ids
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        generate_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            generate_kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        return {
            "input_ids": input_ids,
            "max_new_tokens": max_new_tokens,
            "sampling": sampling,
            "eos_token_ids": eos,
            "pad_token_id": pad,
            "generate_kwargs": generate_kwargs,
            "decoder": None,
            "_extra": {},
        }

    def generate(self, call: dict[str, Any], timer: StageTimer, progress: ProgressFn | None) -> str:
        input_ids = call["input_ids"]
        max_new = call["max_new_tokens"]

        def on_tokens(tokens: list[int]) -> None:
            if progress is not None:
                progress(len(tokens), max_new, self.tokenizer.decode(tokens, skip_special_tokens=True))

        state = DecodeState(max_new, set(call["eos_token_ids"]), call["sampling"], on_tokens)
        forwards = [0]
        handle = self.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        try:
            with torch.inference_mode():
                state.start = time.perf_counter()
                if call["decoder"] is None:
                    tokens = self._hf_generate(call, state)
                else:
                    call["decoder"](self, input_ids, state)
                    tokens = state.tokens
                end = time.perf_counter()
        finally:
            handle.remove()
        ttft = (state.first_token_at or end) - state.start
        timer.seconds["prefill"] += ttft
        timer.seconds["decode"] += end - state.start - ttft
        n = len(tokens)
        extra = call["_extra"]
        extra.update(
            prompt_tokens=int(input_ids.shape[-1]),
            tokens_generated=n,
            output_token_ids=tokens,
            time_to_first_token_s=round(ttft, 6),
            tokens_per_s=round((n - 1) / (end - state.start - ttft), 3) if n > 1 and end - state.start > ttft else None,
            target_forwards=forwards[0],
            tokens_per_target_forward=round(n / forwards[0], 3) if forwards[0] else None,
        )
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _hf_generate(self, call: dict[str, Any], state: DecodeState) -> list[int]:
        from transformers import GenerationConfig

        input_ids = call["input_ids"]
        kwargs = dict(call["generate_kwargs"])
        probe = GenerationConfig()
        # generation settings go into a fresh config (the model's generation_config.json must
        # not change what plain greedy means); objects (assistant_model, tokenizers) stay kwargs
        settings = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(probe, k)}
        config = GenerationConfig(
            eos_token_id=call["eos_token_ids"] or None,
            pad_token_id=call["pad_token_id"],
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None),
            **settings,
        )
        if config.do_sample:
            torch.manual_seed(call["sampling"].seed)  # generate samples from the global RNG
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=_make_streamer(state),
            **kwargs,
        )
        return [int(t) for t in out[0, input_ids.shape[-1]:].tolist()]


# -- helpers shared by the decoding-loop methods ---------------------------------------------

def require_greedy(call: dict[str, Any], method: str) -> None:
    if call["sampling"].do_sample:
        raise ValidationError(
            f"{method} is implemented for greedy decoding only (temperature 0, do_sample off); "
            "it would not preserve the sampling distribution"
        )


def set_decoder(call: dict[str, Any], decoder: Decoder, method: str) -> dict[str, Any]:
    if call.get("decoder") is not None:
        raise ValidationError(f"{method} replaces the decoding loop, and another method already did")
    return {**call, "decoder": decoder}


def decoding_stats(extra: dict[str, Any]) -> dict[str, Any]:
    """Tokens, target forwards and accepted draft tokens of the last run."""
    tokens, forwards = extra.get("tokens_generated", 0), extra.get("target_forwards", 0)
    return {
        "tokens": tokens,
        "target_forwards": forwards,
        "tokens_per_target_forward": round(tokens / forwards, 3) if forwards else 0.0,
        "accepted_draft_tokens": max(0, tokens - forwards),
    }


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer K/V holders of a transformers ``DynamicCache`` (``.keys``/``.values``)."""
    return list(cache.layers)


def keep_cache_positions(cache: Any, keep: torch.Tensor) -> None:
    """Keep only the sequence positions ``keep`` (1-D, ascending) in every layer."""
    for layer in cache_layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = layer.keys.index_select(-2, keep.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, keep.to(layer.values.device))


def crop_cache(cache: Any, length: int) -> None:
    """Truncate every layer to ``length`` positions (layers shorter are left alone)."""
    for layer in cache_layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
