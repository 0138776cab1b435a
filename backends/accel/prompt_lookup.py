"""Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; the draft-free variant
of speculative decoding, Leviathan et al. 2023): the draft is copied from the context.

The last ``max_matching_ngram_size`` tokens are searched for earlier in the prompt and
output; the tokens that followed the match are proposed as a draft and verified by the
target in one forward. No draft model, exact greedy output. Pays when the output repeats
the input (code editing, summarising, extraction); on free generation it proposes little
and costs a slightly wider forward. transformers' own implementation
(``prompt_lookup_num_tokens``) is used.

Codec LMs (MusicGen): the same lookup over the generated positions (K codes each), in our
own loop (``_codec_decoding.ngram_proposer``), since MusicGen's ``generate`` has no
candidate mode. It pays on repetitive audio, where the codec writes the same columns again.
"""

from __future__ import annotations

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel._codec_decoding import CodecHandle, ngram_proposer, verify_loop
from backends.accel._decoding import DecodingHandle, require_greedy, set_decoder
from backends.plan import DecodingPlan


class PromptLookupConfig(MethodConfig):
    num_tokens: int = param(10, min=1, max=64, help="tokens copied after a match and verified in one forward "
                                                    "(transformers default 10)")
    max_matching_ngram_size: int = param(2, min=1, max=8, help="longest n-gram searched for in the context "
                                                               "(longer = fewer, surer matches)")


@register
class PromptLookupMethod(Method):
    spec = MethodSpec(
        name="prompt_lookup",
        title="Prompt lookup decoding",
        modalities=("text", "audio"),
        families=("causal-lm", "codec-lm"),
        summary="Drafts by copying the continuation of a matching n-gram from the context; exact output.",
        paper="Saxena 2023, Prompt Lookup Decoding; Leviathan et al. 2023, Fast Inference from Transformers "
              "via Speculative Decoding (ICML)",
        lossless=True,
        config=PromptLookupConfig,
        slots=("decoder",),
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        if backend.family == "codec-lm":
            return self._attach_codec(plan)
        plan.kwargs.update(prompt_lookup_num_tokens=self.config.num_tokens,
                           max_matching_ngram_size=self.config.max_matching_ngram_size)
        return DecodingHandle(plan, notes=lambda plan: [
            "prompt lookup with sampling keeps the distribution but accepts far fewer tokens than greedy"
        ] if plan.sampling.do_sample else [])

    def _attach_codec(self, plan: DecodingPlan) -> "CodecHandle":
        require_greedy(plan, "prompt lookup over audio codes")
        handle = CodecHandle(plan)

        def decode(backend, plan, on_progress):
            target = backend.session(backend.model, plan)
            propose = ngram_proposer(target, self.config.max_matching_ngram_size)
            columns, handle.codec_stats = verify_loop(target, propose, self.config.num_tokens, on_progress)
            return target.codes(columns)

        set_decoder(plan, decode, "prompt_lookup")
        return handle
