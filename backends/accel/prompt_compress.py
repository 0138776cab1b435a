"""Prompt compression by token surprisal (Jiang et al. 2023, "LLMLingua: Compressing Prompts
for Accelerated Inference of Large Language Models"; Li et al. 2023, "Compressing Context to
Enhance Inference Efficiency of Large Language Models", Selective Context).

A long prompt (documents, examples, source code) holds many tokens a model predicts easily;
they add prefill work and carry little information. A small model scores every prompt token
by its surprisal, -log p(token | the tokens before it), and only the most surprising are
kept, up to ``keep`` of the prompt; the target decodes the shorter prompt as usual. Always
kept, inside that budget: the first token, special tokens (a chat template's marks), the
last ``keep_last`` tokens (the instruction or question, as LLMLingua's budget controller
keeps the question uncompressed) and, with ``keep_lines``, every token holding a line
break (code's line structure). The scorer is the model's paired draft (``tiny-code-draft``
for the bundled code model: one layer, so scoring costs about a twelfth of the target's
prefill) or the model itself. LLMLingua's further steps (demonstration-level selection,
iterative scoring conditioned on the already compressed prefix) are left out: one forward
of the scorer scores the whole prompt.

Lossy: the model reads another prompt. ``keep=1`` drops nothing and is plain decoding
(the scorer is not run). Held-out perplexity says nothing about it (the model is
unchanged): quality is the output's agreement with the uncompressed prompt's output.

It only rewrites the prompt's tokens (a ``prompt_edits`` entry of the plan, run inside the
timed decoding so the scoring counts in the time to first token) and takes no slot: any
decoding method (speculative decoding, the prefix or chunk cache...) runs on the
compressed prompt. The method stats show the kept prompt so a user sees what was dropped.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DecodingPlan, RunHandle
from backends.types import ValidationError

SHOWN_CHARS = 4000  # the kept prompt shown in the method stats, at most
HEAD_ROWS = 256  # positions per output-head matmul while scoring (bounds the logits' memory)


class PromptCompressConfig(MethodConfig):
    keep: float = param(0.6, min=0.05, max=1.0, step=0.05,
                        help="fraction of the prompt's tokens kept (LLMLingua reports 2x-20x compression, "
                             "i.e. 0.5-0.05); 1 = plain decoding")
    keep_last: int = param(32, min=0, max=4096, help="the prompt's last tokens (the instruction) are always kept")
    keep_lines: bool = param(True, help="always keep tokens holding a line break (code's line structure); they "
                                        "count in the kept fraction")
    scorer: str = param("draft", choices=("draft", "self"),
                        help="model that scores each token's surprisal: the model's paired draft (cheap), or "
                             "the model itself")


@torch.inference_mode()
def surprisal(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token_i | tokens before it) for every prompt token; +inf where the scorer has
    no context (the first token of each window of its maximum length)."""
    window = int(getattr(model.config, "max_position_embeddings", 0) or ids.shape[-1])
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    out = torch.full((ids.shape[-1],), float("inf"))
    for start in range(0, ids.shape[-1], window):
        part = ids[:, start:start + window]
        hidden = decoder(input_ids=part).last_hidden_state[0]
        for row in range(0, part.shape[-1] - 1, HEAD_ROWS):
            stop = min(row + HEAD_ROWS, part.shape[-1] - 1)
            logp = torch.log_softmax(head(hidden[row:stop]).float(), dim=-1)
            nxt = part[0, row + 1:stop + 1]
            out[start + row + 1:start + stop + 1] = -logp.gather(-1, nxt[:, None])[:, 0].cpu()
    return out


def kept_positions(scores: torch.Tensor, forced: set[int], keep: float) -> list[int]:
    """The forced positions, then the most surprising others up to ``keep`` of the prompt."""
    n = len(scores)
    budget = max(1, round(keep * n))
    free = [i for i in scores.argsort(descending=True).tolist() if i not in forced]
    return sorted(forced | set(free[:max(0, budget - len(forced))]))


def forced_positions(pieces: list[str], special: set[int], ids: list[int], keep_last: int,
                     keep_lines: bool) -> set[int]:
    n = len(ids)
    forced = {0, *range(max(0, n - keep_last), n)}
    forced |= {i for i, t in enumerate(ids) if t in special}
    if keep_lines:
        forced |= {i for i, piece in enumerate(pieces) if "\n" in piece}
    return forced


@register
class PromptCompressMethod(Method):
    spec = MethodSpec(
        name="prompt_compress",
        title="Prompt compression (LLMLingua)",
        modalities=("text",),
        families=("causal-lm",),
        summary="A small model scores each prompt token's surprisal; the least surprising are dropped down to a "
                "kept fraction (the instruction and line breaks always kept). Lossy; shorter prefill. Combines "
                "with any decoding method.",
        paper="Jiang et al. 2023, LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models "
              "(EMNLP); Li et al. 2023, Compressing Context to Enhance Inference Efficiency of Large Language "
              "Models (Selective Context, EMNLP)",
        lossless=False,
        config=PromptCompressConfig,
        slots=(),
        defaults_note="keep 0.6 rather than LLMLingua's per-task ratios (2x-20x compression): the bundled model's "
                      "output drifts quickly once code tokens go",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """scorer='draft' needs the model's paired draft model."""
        return Limits() if getattr(backend, "draft_id", None) else Limits(search_choices={"scorer": ("self",)})

    def attach(self, backend, plan: DecodingPlan) -> RunHandle:
        config = self.config
        scorer = self.scorer(backend)
        run: dict[str, Any] = {"scorer": config.scorer}

        def compress(b, input_ids: torch.Tensor) -> torch.Tensor:
            ids = input_ids[0].tolist()
            run.update(prompt_tokens=len(ids), kept_tokens=len(ids), dropped_tokens=0, score_s=0.0)
            if config.keep >= 1.0:
                return input_ids
            start = time.perf_counter()
            scores = surprisal(scorer, input_ids)
            pieces = b.tokenizer.batch_decode([[t] for t in ids])
            forced = forced_positions(pieces, set(b.tokenizer.all_special_ids), ids, config.keep_last,
                                      config.keep_lines)
            kept = kept_positions(scores, forced, config.keep)
            run.update(kept_tokens=len(kept), dropped_tokens=len(ids) - len(kept), forced_tokens=len(forced),
                       compression=round(len(ids) / len(kept), 3), score_s=round(time.perf_counter() - start, 6))
            run["compressed_prompt"] = b.tokenizer.decode([ids[i] for i in kept])[:SHOWN_CHARS]
            return input_ids[:, kept]

        plan.prompt_edits.append(compress)
        return RunHandle(plan, lambda: dict(run), self.notes)

    def scorer(self, backend) -> Any:
        """The scoring model: the paired draft, refused unless it shares the tokenizer."""
        if self.config.scorer == "self":
            return backend.model
        draft_id = getattr(backend, "draft_id", None)
        if not draft_id:
            raise ValidationError("prompt compression: this model has no paired draft model; use scorer=self")
        draft, tokenizer = backend.get_draft(draft_id)
        if tokenizer.get_vocab() != backend.tokenizer.get_vocab():
            raise ValidationError(f"prompt compression: the draft '{draft_id}' does not share the model's "
                                  "tokenizer; use scorer=self")
        return draft

    def notes(self, plan: DecodingPlan) -> list[str]:
        if self.config.keep >= 1.0:
            return ["keep 1: no token is dropped, the output is plain decoding's (nothing is saved)"]
        return []
