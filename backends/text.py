"""Text generation with a causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``).

The decoding seam
-----------------
``build_plan`` turns a request into a ``DecodingPlan`` (``backends/plan.py``) that the
methods edit when they attach. Two fields decide how tokens are produced:

``kwargs``
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
    settings, so a custom loop samples exactly like ``generate`` would. ``DecodeState``,
    ``Sampling`` and the cache helpers live in ``backends/accel/_decoding.py``, which
    method modules can import without importing this backend.

Both paths stream: ``progress(n_tokens, max_new_tokens, text_so_far)`` is called as
tokens arrive (a transformers ``BaseStreamer`` for ``generate``, ``state.emit`` for
custom loops), and both fill the same figures in ``Result.extra``: tokens generated,
time to first token (= the ``prefill`` stage), tokens/s over the ``decode`` stage, and
target forwards, whose ratio to tokens is the accepted tokens per target forward that
speculative methods live on (1.0 for plain decoding).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from backends.accel._decoding import DecodeState, Sampling
from backends.base import DraftingBackend, ProgressFn
from backends.catalog import find_bundled
from backends.params import default
from backends.plan import DecodingPlan
from backends.timing import StageTimer
from backends.types import Request, ValidationError

DEFAULT_MAX_NEW_TOKENS = default("text", "max_new_tokens")  # the one table (backends/params.py)


def load_causal_lm(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The one loading path for targets and drafts: tokenizer + model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, tokenizer


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


class TextBackend(DraftingBackend):
    """A causal LM and its tokenizer; drafts for speculative decoding are cached here."""

    modality = "text"
    unused_params = ("steps", "block_length")  # a diffusion LM's denoising settings
    load_model = staticmethod(load_causal_lm)

    def __init__(self, model_id: str, model: Any, tokenizer: Any, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, draft_id: str | None = None):
        super().__init__(model_id, model, device, dtype, draft_id)
        self.tokenizer = tokenizer
        self.family = "causal-lm"
        # what methods keep across runs of this model (the prefix cache's KV, Token Recycling's
        # matrix): per loaded model, dropped on unload; a method object itself keeps no state
        self.run_memory: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "TextBackend":
        from backends.diffusion_lm import DiffusionLMBackend, is_diffusion_lm

        if cls is TextBackend and is_diffusion_lm(source):  # a masked-diffusion LM: its own decoding loop
            return DiffusionLMBackend.from_pretrained(model_id, source, device, dtype)
        model, tokenizer = load_causal_lm(source, device, dtype)
        entry = find_bundled(model_id)
        return cls(model_id, model, tokenizer, device, dtype, draft_id=entry.draft if entry else None)

    # -- Backend -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module | None:
        return self.model

    def unload(self) -> None:
        self.run_memory.clear()
        super().unload()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.model is not None:
            config = self.model.config
            info.update(arch=type(self.model).__name__, layers=getattr(config, "num_hidden_layers", None),
                        vocab=getattr(config, "vocab_size", None), draft=self.draft_id,
                        chat_template=bool(getattr(self.tokenizer, "chat_template", None)))
        return info

    @property
    def eos_token_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def encode_prompt(self, prompt: str, chat_template: bool = True, system_prompt: str = "") -> torch.Tensor:
        """The prompt's token ids; ``system_prompt`` (instructions, few-shot examples) goes
        first: as the system message under a chat template, else as plain text before the
        prompt, so requests that share it share a token prefix (which the prefix cache reuses)."""
        if chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            text = self.tokenizer.apply_chat_template(
                messages + [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = self.tokenizer(system_prompt + prompt, return_tensors="pt").input_ids
        if ids.shape[-1] == 0:
            raise ValidationError("the prompt encodes to no tokens")
        return ids.to(self.device)

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a request the model has no positions for: past ``max_position_embeddings``
        a model only warns and computes garbage (or fails deep in attention)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
            raise ValidationError(
                f"the prompt and system prompt are {prompt_tokens} tokens; with {max_new_tokens} new tokens that is "
                f"over this model's context of {limit} positions: shorten them or ask for fewer new tokens")

    def build_plan(self, request: Request) -> DecodingPlan:
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
        input_ids = self.encode_prompt(request.prompt, bool(params.get("chat_template", True)),
                                       str(params.get("system_prompt") or ""))
        self.check_context(input_ids.shape[-1], max_new_tokens)
        eos = self.eos_token_ids
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        generate_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            generate_kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        return DecodingPlan(kwargs=generate_kwargs, seed=int(request.seed), input_ids=input_ids,
                            max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos, pad_token_id=pad)

    def generate(self, plan: DecodingPlan, timer: StageTimer, progress: ProgressFn | None) -> str:
        input_ids = plan.input_ids
        max_new = plan.max_new_tokens

        def on_tokens(tokens: list[int]) -> None:
            if progress is not None:
                progress(len(tokens), max_new, self.tokenizer.decode(tokens, skip_special_tokens=True))

        state = DecodeState(max_new, set(plan.eos_token_ids), plan.sampling, on_tokens)
        forwards = [0]
        handle = self.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        try:
            with torch.inference_mode():
                state.start = time.perf_counter()
                input_ids = self._edited_prompt(plan)
                if plan.decoder is None:
                    tokens = self._hf_generate(plan, state)
                else:
                    plan.decoder(self, input_ids, state)
                    tokens = state.tokens
                end = time.perf_counter()
        finally:
            handle.remove()
        ttft = (state.first_token_at or end) - state.start
        timer.seconds["prefill"] += ttft
        timer.seconds["decode"] += end - state.start - ttft
        n = len(tokens)
        plan.extra.update(
            prompt_tokens=int(input_ids.shape[-1]),
            tokens_generated=n,
            output_token_ids=tokens,
            time_to_first_token_s=round(ttft, 6),
            tokens_per_s=round((n - 1) / (end - state.start - ttft), 3) if n > 1 and end - state.start > ttft else None,
            target_forwards=forwards[0],
            tokens_per_target_forward=round(n / forwards[0], 3) if forwards[0] else None,
        )
        if plan.decoder is not None and state.per_step:  # a method's loop: tokens kept per step,
            plan.extra.setdefault("tokens_per_step", list(state.per_step))  # unless the loop counted its own
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _edited_prompt(self, plan: DecodingPlan) -> torch.Tensor:
        """The prompt after the plan's prompt edits (none: as encoded), set on the plan so
        ``generate`` and every decoder read the same tokens."""
        for edit in plan.prompt_edits:
            plan.input_ids = edit(self, plan.input_ids)
        return plan.input_ids

    def _hf_generate(self, plan: DecodingPlan, state: DecodeState) -> list[int]:
        from transformers import GenerationConfig

        input_ids = plan.input_ids
        kwargs = dict(plan.kwargs)
        probe = GenerationConfig()
        # generation settings go into a fresh config (the model's generation_config.json must
        # not change what plain greedy means); objects (assistant_model, tokenizers) stay kwargs
        settings = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(probe, k)}
        config = GenerationConfig(
            eos_token_id=plan.eos_token_ids or None,
            pad_token_id=plan.pad_token_id,
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None),
            **settings,
        )
        if config.do_sample:
            torch.manual_seed(plan.sampling.seed)  # generate samples from the global RNG
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=_make_streamer(state),
            **kwargs,
        )
        return [int(t) for t in out[0, input_ids.shape[-1]:].tolist()]
