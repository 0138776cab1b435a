"""Speculative decoding with a draft model (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling").

A small draft model proposes ``num_assistant_tokens`` tokens; the target scores them all
in one forward and keeps the longest prefix it agrees with, plus one token of its own.
Greedy output is unchanged; with sampling, the accept/resample rule keeps the target's
distribution exactly. Greedy decoding with a draft of the same tokenizer runs a lean loop of
our own (``greedy_speculative_decode``: transformers' per-token bookkeeping cost more than a
tiny draft's forward); sampling, and drafts with another tokenizer, use transformers'
``assistant_model`` implementation.

The draft must share the target's tokenizer: ids are exchanged, not text. A draft with a
different vocabulary is refused unless ``universal`` is on, which switches to transformers'
universal assisted decoding (Timor et al. 2025): drafts are re-tokenized through text,
slower, still verified by the target.

Codec language models (MusicGen) get the same idea through our own loop
(``backends.accel._codec_decoding.speculative_loop``), since transformers' MusicGen
``generate`` has no assisted mode: the draft is a smaller model of the same family
(musicgen-small for musicgen-medium) proposing whole positions of K codebook tokens.

Autoregressive image models (family ``ar-image``, LlamaGen style) run ``ar_speculative_loop``
in the token-loop slot that SJD, LANTERN, ZipAR and GSD take (``ARImagePlan.decoder``): the
draft is a smaller model of the same token layout (``tiny-ar-shapes-draft``, 1 layer, for the
4-layer ``tiny-ar-shapes``). Both run classifier-free guidance, so the acceptance compares
the distributions a sample is actually drawn from: each model's CFG-mixed logits, divided by
the temperature and top-k filtered (``ARSampling.probs``). Leviathan/Chen's rule then keeps
the target's distribution exactly (``tests/test_ar_image.py``: a chi-square test over seeds),
and greedy output is the plain loop's token for token.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from backends.accel._ar_decoding import AR_FAMILY, AR_SLOT, ARSession, LoopStats, ProgressFn, draw, set_ar_decoder
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.sjd import AcceptRule, speculative_accept, verify_drafts
from backends.catalog import bundled, find_bundled
from backends.accel._codec_decoding import CodecHandle, check_same_codec, speculative_loop
from backends.accel._decoding import (DecodeState, DecodingHandle, accept_greedy, crop_cache, decoding_stats,
                                      require_greedy, set_decoder)
from backends.plan import ARImagePlan, DecodingPlan, RunHandle
from backends.types import ValidationError

SCHEDULES = {"constant": "constant", "heuristic": "heuristic_transient"}
TEXT_DRAFTS = tuple(m.name for m in bundled("text", available_only=False) if m.family != "diffusion-lm")
# the AR image models a catalog entry names as its draft (a target is never offered as a draft)
AR_DRAFTS = tuple(dict.fromkeys(m.draft for m in bundled("image", available_only=False)
                                if m.family == AR_FAMILY and m.draft))


@torch.no_grad()
def ar_speculative_loop(session: ARSession, progress: ProgressFn | None, draft_pipe: Any, gamma: int,
                        confidence: float = 0.0, schedule: str = "constant", accept: AcceptRule = speculative_accept,
                        stats: LoopStats | None = None, drafting_forwards: list[int] | None = None) -> torch.Tensor:
    """Speculative sampling of an AR image model's tokens with a draft model (module doc).

    Invariant: the target's cache holds the prefix and every output token but the last,
    which the next verification forward feeds first, followed by the ``k`` drafts; so output
    ``j`` of that forward is the target's distribution at draft ``j``'s position, and output
    ``k`` the one after the last draft. A rejected draft is replaced from
    ``norm(max(0, p - q))``; if all are kept, one more token comes from output ``k``. All
    draws, the draft's included, use the target session's generator (one seed, one image).
    ``confidence`` / ``schedule``: as in the text loop (stop drafting on a doubtful draft;
    +2 drafts after a fully accepted round, -1 otherwise); neither touches the distribution,
    which depends only on how each kept token was accepted.
    """
    gen, total = session.gen, session.n_tokens
    stats = stats if stats is not None else LoopStats()
    drafting = session.companion(draft_pipe)
    drafting.prefill()
    prefix = drafting.cached
    out = [draw(session.prefill(), gen)]
    while len(out) < total:
        want = max(1, min(gamma, total - len(out)))
        q = drafting.forward(out[drafting.cached - prefix:])[-1]  # what the draft has not seen yet
        drafts: list[tuple[int, torch.Tensor]] = []
        while True:
            drafts.append((draw(q, gen), q))
            if len(drafts) == want:
                break
            q = drafting.forward([drafts[-1][0]])[-1]
            if confidence and float(q.max()) < confidence:
                break  # the next draft is doubtful: verify what we have
        start = len(out)
        kept, new, refused, _ = verify_drafts(session, out[-1], drafts, accept, total - start)
        stats.drafted += kept + refused
        stats.accepted += kept
        drafting.crop(min(drafting.cached, prefix + start + kept))  # the draft keeps what was accepted
        out += [x for x, _ in drafts[:kept]] + ([new] if new is not None else [])
        if schedule == "heuristic":
            gamma = gamma + 2 if kept == len(drafts) else max(1, gamma - 1)
        if progress is not None:
            progress(min(len(out), total), total, "decode")
    stats.forwards, stats.tokens = session.forwards, len(out[:total])
    if drafting_forwards is not None:
        drafting_forwards[0] += drafting.forwards
    return torch.tensor([out[:total]])


def check_same_layout(target_pipe: Any, draft_pipe: Any, draft_id: str) -> None:
    """ValidationError unless the draft writes the target's tokens after the target's prefix."""
    if draft_pipe.layout != target_pipe.layout:
        raise ValidationError(f"draft model '{draft_id}' has another token layout (codebook, prompt words or grid) "
                              "than the target: its tokens would mean other things")
    target_size = target_pipe.transformer.get_output_embeddings().weight.shape[0]
    draft_size = draft_pipe.transformer.get_output_embeddings().weight.shape[0]
    if target_size != draft_size:
        raise ValidationError(f"draft model '{draft_id}' has {draft_size} output logits but the target has "
                              f"{target_size}")


def bundled_draft_layout(draft_id: str) -> Any:
    """The token layout a bundled AR draft declares (its ``layout.json``; no weights loaded),
    or None when its assets are missing. Read each time (a small JSON file), so a draft
    trained while the studio runs is seen at once."""
    from backends.tiny.ar_image import read_layout

    entry = find_bundled(draft_id)
    if entry is None or not entry.available or not (entry.path / "layout.json").is_file():
        return None
    return read_layout(entry.path)


def pipe_layers(pipe: Any) -> int | None:
    """The transformer depth of a loaded AR pipeline, or None where it has no such config."""
    return getattr(getattr(getattr(pipe, "transformer", None), "config", None), "num_hidden_layers", None)


def shallower(draft_layers: int | None, target_layers: int | None) -> bool:
    """A draft as deep as its target costs a target forward per drafted token: it only adds
    work (a folder copy of a bundled draft, loaded as the model, is one). Unknown: allowed."""
    return draft_layers is None or target_layers is None or draft_layers < target_layers


def bundled_draft_layers(draft_id: str) -> int | None:
    """The transformer depth a bundled AR draft declares (its ``transformer/config.json``;
    no weights loaded), or None when unknown."""
    entry = find_bundled(draft_id)
    path = entry.path / "transformer" / "config.json" if entry is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"])
    except (ValueError, KeyError, TypeError):
        return None


def ar_draft_limits(backend) -> Limits:
    """The drafts that can speculate for this AR image model: those of its token layout (a
    loaded draft's own, a bundled one's ``layout.json``) with fewer layers than the model,
    so never the model itself, even loaded from a folder copy of a draft. With none,
    the method is unfit (a hub model such as Janus or Emu3 has no draft of its layout), so
    neither the tuner nor the Image tab offers it. 'auto' stays allowed (the attach says why a
    missing or mismatched paired draft cannot run) but is searched only where it fits."""
    layout, depth = getattr(backend.pipe, "layout", None), pipe_layers(backend.pipe)

    def fits(draft_id: str) -> bool:
        loaded = backend.drafts.get(draft_id)
        draft_layout = loaded.layout if loaded is not None else bundled_draft_layout(draft_id)
        layers = pipe_layers(loaded) if loaded is not None else bundled_draft_layers(draft_id)
        return (draft_id != backend.model_id and draft_layout is not None and draft_layout == layout
                and shallower(layers, depth))

    named = tuple(d for d in AR_DRAFTS if fits(d))
    paired = bool(backend.draft_id) and fits(backend.draft_id)
    if not named and not paired:
        missing = backend.draft_id and backend.draft_id not in backend.drafts
        if missing and bundled_draft_layout(backend.draft_id) is None:
            return Limits(unfit=f"speculative: the paired draft model '{backend.draft_id}' is not available "
                                "(its files are missing)")
        return Limits(unfit="speculative: no bundled draft model shares this model's token layout (codebook, "
                            "prompt words, grid) with fewer layers than it, and speculative decoding needs one")
    # 'auto' is the paired draft: the search does not try it twice under its own name
    searched = ("auto",) * paired + tuple(d for d in named if d != backend.draft_id)
    return Limits(choices={"draft": ("auto", *named), "universal": (False,)}, search_choices={"draft": searched})


def paired_draft_limits(cls, backend) -> Limits:
    """draft='auto' means the model's paired draft: with none, the search leaves the method
    out (draft is not searched); the attach refuses it with the reason."""
    if getattr(backend, "draft_id", None):
        return Limits()
    return Limits(search_choices={"draft": tuple(c for c in cls.spec.param("draft").choices if c != "auto")})


def check_same_vocab(target_tok: Any, target_model: Any, draft_tok: Any, draft_model: Any, draft_id: str) -> None:
    """ValidationError unless the draft's token ids mean what the target's mean."""
    target_vocab, draft_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    if target_vocab != draft_vocab:
        shared = len(set(target_vocab.items()) & set(draft_vocab.items()))
        raise ValidationError(
            f"draft model '{draft_id}' has a different tokenizer than the target ({len(draft_vocab)} vs "
            f"{len(target_vocab)} tokens, {shared} identical): its token ids would be garbage to the target. "
            "Pick a draft trained with the same tokenizer, or turn on 'universal' (slower)."
        )
    target_size = target_model.get_output_embeddings().weight.shape[0]
    draft_size = draft_model.get_output_embeddings().weight.shape[0]
    if target_size != draft_size:
        raise ValidationError(
            f"draft model '{draft_id}' has {draft_size} output logits but the target has {target_size}: "
            "same tokenizer, differently padded heads; speculative sampling needs them equal"
        )


@torch.no_grad()
def greedy_speculative_decode(backend, input_ids: torch.Tensor, state: DecodeState, draft: Any, gamma: int,
                              confidence: float = 0.0, schedule: str = "constant") -> None:
    """Greedy speculative decoding in a lean loop of our own (exact greedy output).

    transformers' assisted generation does the same arithmetic, but its per-token
    bookkeeping costs more than a tiny draft's forward on CPU (measured ~1.0x where the
    forward costs predict 1.4x); this loop only runs the two models and crops caches.
    ``confidence``: stop drafting once the draft's top probability falls below it (a token
    the draft doubts is likely rejected, and each one widens the verification forward).
    ``schedule="heuristic"``: transformers' rule, +2 drafts after a fully accepted round,
    -1 otherwise.
    """
    from transformers import DynamicCache

    target = backend.model
    t_cache, d_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    out = target(input_ids=input_ids, past_key_values=t_cache, use_cache=True)
    current = int(out.logits[0, -1].argmax())
    if state.emit([current]):
        return
    seq = input_ids[0].tolist() + [current]  # t_cache holds all of seq but its last token
    while True:
        k = max(1, min(gamma, state.remaining - 1))
        pending = seq[d_cache.get_seq_length():]  # what the draft has not seen (at least `current`)
        drafts: list[int] = []
        for _ in range(k):
            logits = draft(input_ids=torch.tensor([pending], device=input_ids.device), past_key_values=d_cache,
                           use_cache=True).logits[0, -1]
            token = int(logits.argmax())
            if confidence and drafts and float(logits.softmax(-1)[token]) < confidence:
                break  # the first draft is always kept: a round drafts at least one token
            drafts.append(token)
            pending = [token]
            if token in state.eos_token_ids:
                break
        ids = torch.tensor([[current] + drafts], device=input_ids.device)
        greedy = target(input_ids=ids, past_key_values=t_cache, use_cache=True).logits[0].argmax(-1).tolist()
        accepted = accept_greedy(drafts, greedy)
        if schedule == "heuristic":
            gamma = gamma + 2 if len(accepted) == len(drafts) + 1 else max(1, gamma - 1)
        seq += accepted
        crop_cache(t_cache, len(seq) - 1)
        crop_cache(d_cache, min(d_cache.get_seq_length(), len(seq) - 1))
        if state.emit(accepted):
            return
        current = accepted[-1]


class SpeculativeConfig(MethodConfig):
    draft: str = param("auto", choices=("auto", *TEXT_DRAFTS, *AR_DRAFTS),
                       help="draft model; 'auto' = the model's paired draft (bundled models name theirs)")
    num_assistant_tokens: int = param(5, min=1, max=32, help="tokens drafted per target forward (transformers "
                                                             "default 20; 3-8 suits small drafts)")
    schedule: str = param("constant", choices=tuple(SCHEDULES),
                          help="'heuristic': +2 draft tokens after a fully accepted round, -1 otherwise (reset "
                               "each run)")
    confidence_threshold: float = param(0.0, min=0.0, max=1.0, step=0.05,
                                        help="stop drafting early when the draft's top probability falls below "
                                             "this (0 = off)")
    universal: bool = param(False, help="allow a draft with a different tokenizer (universal assisted decoding, "
                                        "via text)")


@register
class SpeculativeMethod(Method):
    spec = MethodSpec(
        name="speculative",
        title="Speculative decoding (draft model)",
        modalities=("text", "audio", "image"),
        families=("causal-lm", "codec-lm", AR_FAMILY),
        summary="A small draft model proposes tokens the target verifies in one forward; exact output "
                "(greedy) or exact distribution (sampling). AR image models: with CFG, in the token loop.",
        paper="Leviathan et al. 2023, Fast Inference from Transformers via Speculative Decoding (ICML); "
              "Chen et al. 2023, Accelerating LLM Decoding with Speculative Sampling",
        lossless=True,
        config=SpeculativeConfig,
        # "decoder": a language model's decoding; AR_SLOT: an AR image model's token loop
        slots=("decoder", AR_SLOT),
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """Drafts of the model's own kind; an AR image draft shares the target's layout, so
        'universal' (re-tokenizing through text) has no meaning there."""
        if getattr(backend, "family", None) == AR_FAMILY:
            return ar_draft_limits(backend)
        choices = ("auto", *TEXT_DRAFTS)
        if getattr(backend, "family", None) == "codec-lm":  # text drafts never share a codec's tokens
            return Limits(choices={"draft": choices}, search_choices={"draft": ("auto",) if backend.draft_id else ()})
        paired = paired_draft_limits(cls, backend)
        # the model as its own draft runs (every draft kept) but only adds a forward, and 'auto'
        # is the paired draft: neither is a trial of its own
        searched = tuple(c for c in paired.search_choices.get("draft", choices)
                         if c != backend.model_id and c != backend.draft_id)
        return Limits(choices={"draft": choices}, search_choices={"draft": searched})

    def attach(self, backend, plan: DecodingPlan | ARImagePlan) -> DecodingHandle | CodecHandle | RunHandle:
        draft_id = backend.draft_id if self.config.draft == "auto" else self.config.draft
        if not draft_id:
            raise ValidationError(
                f"model '{backend.model_id}' has no paired draft model; choose one in the method's 'draft' setting"
            )
        draft, draft_tokenizer = backend.get_draft(draft_id)
        gamma = self.config.num_assistant_tokens
        if backend.family == AR_FAMILY:
            return self._attach_ar(backend, plan, draft, draft_id)
        if backend.family == "codec-lm":
            check_same_codec(backend.model, draft, draft_id)
            require_greedy(plan, "speculative decoding of audio codes")
            handle = CodecHandle(plan, draft=draft_id)

            def decode(backend, plan, on_progress):
                target, drafting = backend.session(backend.model, plan), backend.session(draft, plan)
                columns, handle.codec_stats = speculative_loop(target, drafting, gamma, on_progress)
                return target.codes(columns)

            set_decoder(plan, decode, "speculative")
            return handle
        same_vocab = True
        try:
            check_same_vocab(backend.tokenizer, backend.model, draft_tokenizer, draft, draft_id)
        except ValidationError:
            if not self.config.universal:
                raise
            same_vocab = False
        forwards = [0]

        def stats() -> dict[str, Any]:
            own: dict[str, Any] = {"draft": draft_id, "draft_forwards": forwards[0], "universal": not same_vocab}
            if forwards[0]:
                accepted = decoding_stats(plan.extra)["accepted_draft_tokens"]
                own["acceptance_rate"] = round(min(1.0, accepted / forwards[0]), 3)
            return own

        handle = DecodingHandle(plan, stats, lambda _plan: self.notes(backend, draft, draft_id, same_vocab))
        with handle.undo_on_error():
            self._configure_draft(handle, draft)
            hook = draft.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
            handle.on_remove(hook.remove)
            if same_vocab and not plan.sampling.do_sample:  # greedy: our lean loop
                confidence, schedule = self.config.confidence_threshold, self.config.schedule
                set_decoder(plan, lambda b, ids, st: greedy_speculative_decode(b, ids, st, draft, gamma, confidence,
                                                                               schedule), "speculative")
            else:
                plan.kwargs["assistant_model"] = draft
                if not same_vocab:
                    plan.kwargs.update(tokenizer=backend.tokenizer, assistant_tokenizer=draft_tokenizer)
        return handle

    def _attach_ar(self, backend, plan: ARImagePlan, draft_pipe: Any, draft_id: str) -> RunHandle:
        """The AR image token loop with the draft (``ar_speculative_loop``)."""
        check_same_layout(backend.pipe, draft_pipe, draft_id)
        cfg, stats, drafting_forwards = self.config, LoopStats(), [0]
        handle = RunHandle(plan, stats=lambda: {**stats.as_dict(), "draft": draft_id,
                                                "draft_forwards": drafting_forwards[0]})
        handle.on_remove(set_ar_decoder(plan, lambda session, progress: ar_speculative_loop(
            session, progress, draft_pipe, cfg.num_assistant_tokens, cfg.confidence_threshold, cfg.schedule,
            stats=stats, drafting_forwards=drafting_forwards)))
        return handle

    def _configure_draft(self, handle: DecodingHandle, draft) -> None:
        """Set the draft's assisted-generation settings for this run; put them back on remove."""
        generation = draft.generation_config
        names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        saved = {n: getattr(generation, n, None) for n in names}
        handle.on_remove(lambda: [setattr(generation, n, v) for n, v in saved.items()])
        generation.num_assistant_tokens = self.config.num_assistant_tokens
        generation.num_assistant_tokens_schedule = SCHEDULES[self.config.schedule]
        # 0.0, not None: transformers fills None with its default (0.4), which would stop drafts early
        generation.assistant_confidence_threshold = self.config.confidence_threshold

    def notes(self, backend, draft, draft_id: str, same_vocab: bool) -> list[str]:
        notes = []
        if not same_vocab:
            notes.append(f"draft '{draft_id}' has a different tokenizer: universal assisted decoding "
                         "re-tokenizes every draft through text (slower)")
        target_layers = getattr(backend.model.config, "num_hidden_layers", 0)
        draft_layers = getattr(draft.config, "num_hidden_layers", 0)
        if target_layers and draft_layers and draft_layers * 3 > target_layers:
            notes.append(f"the draft has {draft_layers} layers for the target's {target_layers}: on CPU a forward "
                         "costs about the same per layer, so a draft this deep rarely pays")
        return notes
