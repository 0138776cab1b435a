"""Decoding loops for codec language models (MusicGen layout): our own, so they can be replaced.

A MusicGen decoder predicts ``K`` codebook tokens per audio frame, with the *delay
pattern*: codebook ``k`` runs ``k`` positions behind codebook 0, so a sequence of
``L`` positions holds ``L - K`` frames and every position mixes frames. Positions the
pattern fixes (the staggered start and end) are forced to the pad token. Classifier-free
guidance runs the conditional and unconditional rows as one batch of ``2K`` and mixes
their logits (``uncond + (cond - uncond) * scale``), as transformers' MusicGen
``generate`` does.

transformers' ``generate`` for MusicGen only does greedy or sampling (no assistant
model), so speculative decoding needs a loop of its own. ``CodecSession`` holds one
prompt's state on one model (encoder output, KV cache, delay pattern); ``greedy_loop`` is
the plain loop (a test checks it reproduces ``generate`` token for token) and
``speculative_loop`` lets a smaller model of the same family propose ``gamma`` positions
that the target checks in one forward, keeping the longest agreeing prefix plus one of
its own: the output is the target's greedy output, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backends.accel._decoding import crop_cache
from backends.plan import DecodingPlan, RunHandle
from backends.types import ValidationError


def codec_special_ids(model: Any) -> tuple[int, int]:
    """(decoder start id, pad id) the way MusicGen's generate resolves them."""
    gen = model.generation_config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else model.decoder.config.decoder_start_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.decoder.config.pad_token_id
    return int(start), int(pad)


def check_same_codec(target: Any, draft: Any, draft_id: str) -> None:
    """ValidationError unless the draft speaks the target's codebooks."""
    t, d = target.decoder.config, draft.decoder.config
    mismatches = [name for name in ("num_codebooks", "vocab_size", "audio_channels") if getattr(t, name) != getattr(d, name)]
    if codec_special_ids(target) != codec_special_ids(draft):
        mismatches.append("special token ids")
    if mismatches:
        raise ValidationError(
            f"draft model '{draft_id}' does not share the target's audio codes ({', '.join(mismatches)} differ): "
            "pick a smaller model of the same family (e.g. musicgen-small for musicgen-medium)"
        )


@dataclass
class CodecSession:
    """One prompt on one codec LM: encoder states (CFG-doubled), delay pattern, KV cache."""

    model: Any
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    guidance_scale: float
    max_length: int
    forwards: int = 0
    cached: int = 0  # positions held in the self-attention cache
    cache: Any = None
    encoder_outputs: Any = field(default=None, repr=False)
    pattern: torch.Tensor = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from transformers.modeling_outputs import BaseModelOutput

        self.num_codebooks = int(self.model.decoder.num_codebooks)
        self.start_id, self.pad_id = codec_special_ids(self.model)
        hidden = self.model.get_encoder()(input_ids=self.input_ids, attention_mask=self.attention_mask).last_hidden_state
        mask = self.attention_mask
        if self.cfg:
            hidden = torch.cat([hidden, torch.zeros_like(hidden)], dim=0)
            mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
        self.encoder_outputs, self.mask = BaseModelOutput(last_hidden_state=hidden), mask
        start = torch.full((self.num_codebooks, 1), self.start_id, dtype=torch.long, device=self.input_ids.device)
        _, self.pattern = self.model.decoder.build_delay_pattern_mask(start, self.start_id, max_length=self.max_length)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale > 1

    def first_column(self) -> torch.Tensor:
        return torch.full((self.num_codebooks,), self.start_id, dtype=torch.long, device=self.pattern.device)

    def fix(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """The token the sequence holds at ``position``: the prediction, or what the pattern forces."""
        forced = self.pattern[:, position]
        return torch.where(forced == -1, tokens, forced)

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """Feed ``columns`` (K, n) after the cached positions; guided logits (K, n, vocab) in float32."""
        x = columns.repeat(2, 1) if self.cfg else columns
        out = self.model(encoder_outputs=self.encoder_outputs, attention_mask=self.mask, decoder_input_ids=x,
                         past_key_values=self.cache, use_cache=True)
        self.cache, self.forwards = out.past_key_values, self.forwards + 1
        self.cached += columns.shape[-1]
        logits = out.logits.float()
        if self.cfg:
            cond, uncond = logits.split(self.num_codebooks, dim=0)
            logits = uncond + (cond - uncond) * self.guidance_scale
        return logits

    def rewind(self, length: int) -> None:
        """Forget cached positions from ``length`` on (rejected proposals)."""
        if self.cached > length:
            crop_cache(getattr(self.cache, "self_attention_cache", self.cache), length)
            self.cached = length

    def codes(self, columns: list[torch.Tensor]) -> torch.Tensor:
        """(1, 1, K, frames) audio codes of a finished sequence, pads removed (as ``generate`` does)."""
        seq = torch.stack(columns, dim=1)
        return seq[seq != self.pad_id].reshape(1, 1, self.num_codebooks, -1)


OnFrames = Callable[[int], bool]  # called with the sequence length so far; True = stop


def greedy_loop(session: CodecSession, on_progress: OnFrames | None = None) -> list[torch.Tensor]:
    """Plain greedy decoding, one position per forward: the reference the fast loops must match."""
    columns = [session.first_column()]
    while len(columns) < session.max_length:
        logits = session.forward(columns[-1][:, None])[:, -1]
        columns.append(session.fix(logits.argmax(-1), len(columns)))
        if on_progress is not None and on_progress(len(columns)):
            break
    return columns


Proposer = Callable[[list[torch.Tensor], int], list[torch.Tensor]]  # (columns so far, count) -> proposals


def verify_loop(target: CodecSession, propose: Proposer, gamma: int,
                on_progress: OnFrames | None = None) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Greedy draft-and-verify over positions (all K codebooks of a position at once).

    ``propose`` guesses up to ``gamma`` next positions; the target scores them in one
    forward and keeps the longest prefix whose guided argmax equals the guess on every
    codebook, plus one position of its own, so the output is the target's greedy output.
    """
    columns = [target.first_column()]
    proposed = accepted = 0
    while len(columns) < target.max_length:
        size = len(columns)
        steps = min(gamma, target.max_length - size - 1)
        proposals = propose(columns, steps) if steps > 0 else []
        feed = torch.stack([columns[-1], *proposals], dim=1)
        target.rewind(size - 1)
        verdict = target.forward(feed)
        picks = [target.fix(verdict[:, i].argmax(-1), size + i) for i in range(len(proposals) + 1)]
        n = 0
        while n < len(proposals) and torch.equal(picks[n], proposals[n]):
            n += 1
        proposed += len(proposals)
        accepted += n
        columns.extend(proposals[:n])
        columns.append(picks[n])
        target.rewind(size + n)
        if on_progress is not None and on_progress(len(columns)):
            break
    positions = len(columns) - 1
    stats = {"proposed_positions": proposed, "accepted_positions": accepted, "target_forwards": target.forwards,
             "positions": positions,
             "positions_per_target_forward": round(positions / target.forwards, 3) if target.forwards else 0.0}
    if proposed:
        stats["acceptance_rate"] = round(accepted / proposed, 3)
    return columns, stats


def draft_proposer(target: CodecSession, draft: CodecSession) -> Proposer:
    """A smaller model of the same family guesses, one forward per guessed position."""

    def propose(columns: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        size = len(columns)
        draft.rewind(size - 1)  # drop what the draft cached of rejected guesses
        pending, proposals = torch.stack(columns[draft.cached:], dim=1), []
        for i in range(steps):
            logits = draft.forward(pending)[:, -1]
            proposals.append(target.fix(logits.argmax(-1), size + i))
            pending = proposals[-1][:, None]
        return proposals

    return propose


def ngram_proposer(target: CodecSession, max_ngram: int) -> Proposer:
    """Guess that the last positions continue as they did where they last occurred (the
    longest match of up to ``max_ngram`` positions wins, as in transformers' prompt lookup).

    Free (no model call); pays on repetitive audio (sustained notes, loops, silence), where
    the codec writes the same columns again.
    """
    index: dict[tuple[int, bytes], int] = {}  # (n, the n positions ending at i) -> latest such i
    indexed = [0]  # positions whose n-grams are in the index

    def key(columns: list[torch.Tensor], end: int, n: int) -> tuple[int, bytes]:
        return n, torch.stack(columns[end - n + 1 : end + 1]).cpu().numpy().tobytes()

    def propose(columns: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        size = len(columns)
        for end in range(indexed[0], size - 1):  # every n-gram but those ending at the newest position
            for n in range(1, min(max_ngram, end + 1) + 1):
                index[key(columns, end, n)] = end
        indexed[0] = max(indexed[0], size - 1)
        for n in range(min(max_ngram, size), 0, -1):
            hit = index.get(key(columns, size - 1, n))
            if hit is not None:
                follow = columns[hit + 1 : hit + 1 + steps]
                return [target.fix(col, size + i) for i, col in enumerate(follow)]
        return []

    return propose


def speculative_loop(target: CodecSession, draft: CodecSession, gamma: int,
                     on_progress: OnFrames | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Speculative decoding with a draft codec LM (see ``verify_loop``)."""
    columns, stats = verify_loop(target, draft_proposer(target, draft), gamma, on_progress)
    return columns, dict(stats, draft_forwards=draft.forwards)


class CodecHandle(RunHandle):
    """One run of a codec-LM decoding loop: its stats are the loop's own figures."""

    def __init__(self, plan: DecodingPlan, **extra_stats: Any):
        super().__init__(plan)
        self.codec_stats: dict[str, Any] = {}
        self.extra_stats = extra_stats

    def stats(self) -> dict[str, Any]:
        return {**self.codec_stats, **self.extra_stats}
