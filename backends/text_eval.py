"""Held-out perplexity of a causal LM as run (methods attached), and calibration text.

Why perplexity: a tiny model's greedy output diverges from the baseline within a few
tokens under any lossy change (token agreement then says little); the mean next-token
loss over text the model never trained on says whether the change damaged the model.

The text: the bundled code model's own held-out split (``backends.tiny.text_models.
stdlib_files``: CPython's stdlib ``*.py`` files, tests excluded, sorted; every 20th file
held out of training). It is that split because it encodes to exactly the 159,894 tokens
``assets/tiny-code-llama/training_report.json`` records as its held-out set. The first
``max_tokens`` of it (a few thousand: seconds on CPU) are scored. Calibration (AWQ) reads
the *training* split instead, so calibrating never sees the evaluation text.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch

DEFAULT_TOKENS = 4096
CONTEXT = 256  # the window the bundled model trained on


def _split_text(which: str, max_files: int, stride: int) -> list[str]:
    from backends.tiny.text_models import read_text, stdlib_files

    train, heldout = stdlib_files()
    files = heldout if which == "heldout" else train
    return [read_text(p) for p in files[::stride][:max_files]]


# per tokenizer, weakly: the token ids go when the model (and its tokenizer) is unloaded
_ENCODED: "weakref.WeakKeyDictionary[Any, dict[tuple[str, int], torch.Tensor]]" = weakref.WeakKeyDictionary()
MAX_ENCODED_PER_TOKENIZER = 8


def _encoded(tokenizer: Any, which: str, max_tokens: int) -> torch.Tensor:
    """``max_tokens`` + 1 tokens of the split, encoded once per tokenizer (kept while it lives)."""
    kept = _ENCODED.setdefault(tokenizer, {})
    key = (which, max_tokens)
    if key not in kept:
        if len(kept) >= MAX_ENCODED_PER_TOKENIZER:
            kept.pop(next(iter(kept)))
        kept[key] = _encode(tokenizer, which, max_tokens)
    return kept[key]


def _encode(tokenizer: Any, which: str, max_tokens: int) -> torch.Tensor:
    """``max_tokens`` + 1 tokens of the split as one stream: bos, file, eos, bos, file..."""
    stride = 1 if which == "heldout" else 37  # calibration: files spread over the training split
    ids: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for text in _split_text(which, 64, stride):
        ids += [t for t in (bos,) if t is not None] + tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        ids += [t for t in (eos,) if t is not None]
        if len(ids) > max_tokens:
            break
    return torch.tensor(ids[: max_tokens + 1], dtype=torch.long)


def heldout_ids(tokenizer: Any, max_tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    return _encoded(tokenizer, "heldout", max_tokens)


def calibration_ids(tokenizer: Any, max_tokens: int = 2048) -> torch.Tensor:
    return _encoded(tokenizer, "train", max_tokens)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, context: int = CONTEXT, batch: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping ``context``-token
    windows of ``ids`` (each window predicts its own tokens 2..context+1)."""
    device = next(model.parameters()).device
    windows = max(1, (len(ids) - 1) // context)
    context = min(context, len(ids) - 1)
    total, count = 0.0, 0
    for start in range(0, windows, batch):
        rows = range(start, min(windows, start + batch))
        x = torch.stack([ids[r * context: (r + 1) * context] for r in rows]).to(device)
        y = torch.stack([ids[r * context + 1: (r + 1) * context + 1] for r in rows]).to(device)
        logits = model(input_ids=x).logits.float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                   reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def backend_perplexity(backend: Any, methods: Sequence[Any] = (), max_tokens: int = DEFAULT_TOKENS) -> float:
    """Held-out perplexity of a text backend's model with ``methods`` (MethodChoice list)
    attached as a run would attach them, removed afterwards."""
    from backends.plan import attached
    from backends.types import Request
    from backends.base import _instantiate

    request = Request("text", backend.model_id, "x", params={"max_new_tokens": 1}, methods=list(methods))
    built = _instantiate(request, backend)
    ids = heldout_ids(backend.tokenizer, max_tokens)
    context = min(CONTEXT, getattr(backend.model.config, "max_position_embeddings", CONTEXT))
    if any(getattr(method, "acts_while_decoding", False) for method in built):
        return decoding_perplexity(backend, request, built, ids, context)
    with backend.lock:
        plan = backend.build_plan(request)
        with attached(backend, plan, built):
            return perplexity(backend.model, ids, context)


DECODE_PROMPT = 16  # tokens of each window given as the prompt (one forward); the rest decoded one by one


@torch.inference_mode()
def decoding_perplexity(backend: Any, request: Any, built: Sequence[Any], ids: torch.Tensor, context: int,
                        prompt: int = DECODE_PROMPT) -> float:
    """Perplexity as generation sees it, for methods that act only while decoding: each
    ``context``-token window is a fresh run (methods attached anew, a fresh cache, the
    plan's own when a method hands one to ``generate``): its first ``prompt`` tokens in one
    forward, then the held-out tokens fed back one at a time (teacher forcing), every
    position scored. Without methods it equals ``perplexity`` up to rounding."""
    from transformers import DynamicCache

    from backends.plan import attached

    model = backend.model
    device = next(model.parameters()).device
    windows = max(1, (len(ids) - 1) // context)
    context = min(context, len(ids) - 1)
    total, count = 0.0, 0
    with backend.lock:
        for w in range(windows):
            x = ids[w * context: (w + 1) * context][None].to(device)
            y = ids[w * context + 1: (w + 1) * context + 1].to(device)
            plan = backend.build_plan(request)
            with attached(backend, plan, built):
                cache = plan.kwargs.get("cache") or DynamicCache(config=model.config)
                logits = [model(input_ids=x[:, :prompt], cache=cache, use_cache=True).logits[0].float()]
                for i in range(prompt, x.shape[-1]):
                    logits.append(model(input_ids=x[:, i:i + 1], cache=cache, use_cache=True).logits[0].float())
            scores = torch.cat(logits)
            total += torch.nn.functional.cross_entropy(scores, y, reduction="sum").item()
            count += y.numel()
    return math.exp(total / count)


# ----------------------------------------------------------------------------- generated text

JUDGE_MODEL = "tiny-code-llama"  # the AR code model that scores what a diffusion LM wrote
_JUDGES: dict[str, tuple[Any, Any]] = {}


def judge(model_id: str = JUDGE_MODEL) -> tuple[Any, Any]:
    """(model, tokenizer) of the bundled causal LM that scores generated code, loaded once."""
    if model_id not in _JUDGES:
        from backends.catalog import resolve_source
        from backends.text import load_causal_lm

        _JUDGES[model_id] = load_causal_lm(resolve_source(model_id), torch.device("cpu"), torch.float32)
    return _JUDGES[model_id]


@torch.inference_mode()
def continuation_nll(model: Any, tokenizer: Any, prompt: str, text: str) -> tuple[float, int]:
    """Summed next-token NLL of ``text`` given ``prompt`` under a causal LM, and its token
    count (the prompt is context, not scored)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + tokenizer(prompt, add_special_tokens=False).input_ids
    tail = tokenizer(text, add_special_tokens=False).input_ids
    if not tail or not head:
        return 0.0, 0
    limit = getattr(model.config, "max_position_embeddings", 1024)
    ids = torch.tensor([(head + tail)[-limit:]])
    n = min(len(tail), ids.shape[1] - 1)
    logits = model(input_ids=ids).logits[0, -n - 1:-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, -n:], reduction="sum").item(), n


def output_perplexity(prompts: Sequence[str], outputs: Sequence[str], model_id: str = JUDGE_MODEL) -> float | None:
    """Perplexity of generated continuations under the judge model (tiny-code-llama):
    exp of the mean NLL per generated token over all outputs. A quality figure that needs
    no reference and compares across decoding methods of a model that writes code (the
    diffusion LM), where token agreement falls off after the first changed token."""
    model, tokenizer = judge(model_id)
    total, count = 0.0, 0
    for prompt, text in zip(prompts, outputs):
        nll, n = continuation_nll(model, tokenizer, prompt, text)
        total, count = total + nll, count + n
    return math.exp(total / count) if count else None
