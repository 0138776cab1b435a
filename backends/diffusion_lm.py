"""Text generation with a masked-diffusion language model (LLaDA / Dream style).

A diffusion LM is a bidirectional transformer that fills in mask tokens; it is one more
kind of text model, chosen in the Text tab like a causal LM. ``TextBackend.from_pretrained``
hands a model of this kind here (``is_diffusion_lm``), so requests, streaming, the
measured figures (tokens, time to first token, target forwards), Compare, History and
Presets are the causal LM's; only the decoding loop differs: LLaDA's semi-autoregressive
denoising (``backends/accel/_dllm_decoding.py``) with ``max_new_tokens`` as gen_length and
two request parameters of its own, ``steps`` (denoising steps, default one per token) and
``block_length`` (default 32). Methods of family ``diffusion-lm`` (Fast-dLLM, dKV-Cache)
edit the run's ``DiffusionDecodingPlan``.

Two loading paths, one ``from_pretrained`` each:

bundled (``tiny-code-dllm``, ``backends/tiny/dllm_models.py``)
    a ``LlamaForCausalLM`` folder whose config.json has a ``diffusion_lm`` entry (mask
    token, shifted prediction). It runs with a 4D all-True attention mask (transformers
    uses a given 4D mask as is, so attention is bidirectional) and supports K/V caches
    through ``past_key_values`` with explicit ``position_ids``.
hub (LLaDA ``GSAI-ML/LLaDA-8B-Instruct``, Dream ``Dream-org/Dream-v0-Instruct-7B``)
    ``AutoModel.from_pretrained(..., trust_remote_code=True)``: their own modelling code,
    called with ``input_ids`` only; LLaDA predicts in place, Dream shifted. Their code
    exposes no K/V cache, so the cached modes refuse them and parallel decoding applies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from backends.accel._decoding import DecodeState
from backends.accel._dllm_decoding import KV, DiffusionDecodingPlan, diffusion_generate
from backends.text import TextBackend
from backends.types import Request, ValidationError

FAMILY = "diffusion-lm"
DEFAULT_BLOCK_LENGTH = 32
LLADA_MASK_ID = 126336  # LLaDA's [MASK] (its remote config does not name it)
HUB_NAME = re.compile(r"llada|^dream(-|_|$)", re.IGNORECASE)  # LLaDA-8B-Instruct, Dream-v0-Instruct-7B
REMOTE_TYPES = {"llada", "dream"}


def _local_config(source: str) -> dict[str, Any] | None:
    path = Path(source) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def is_diffusion_lm(source: str) -> bool:
    """A bundled diffusion LM folder, a local LLaDA / Dream folder, or a hub id naming one."""
    config = _local_config(source)
    if config is not None:
        return "diffusion_lm" in config or str(config.get("model_type", "")).lower() in REMOTE_TYPES
    return bool(HUB_NAME.search(source.split("/")[-1]))


class LlamaRunner:
    """The bundled model: a Llama made bidirectional by a 4D all-True mask."""

    supports_cache = True

    def __init__(self, model: Any, mask_id: int, shift: int):
        self.model, self.mask_id, self.shift = model, mask_id, shift

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, past: KV | None,
                keep: bool) -> tuple[torch.Tensor, KV | None]:
        from transformers import DynamicCache

        n_past = past[0][0].shape[-2] if past else 0
        cache = DynamicCache(ddp_cache_data=past) if past else (DynamicCache() if keep else None)
        mask = torch.ones(1, 1, ids.shape[1], n_past + ids.shape[1], dtype=torch.bool, device=ids.device)
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=mask,
                         cache=cache, use_cache=cache is not None)
        kv = None
        if keep:
            q = ids.shape[1]
            kv = [(layer.keys[..., -q:, :].clone(), layer.values[..., -q:, :].clone()) for layer in cache.layers]
        return out.logits[0], kv


class RemoteRunner:
    """LLaDA / Dream through their own code: whole-sequence forwards only."""

    supports_cache = False

    def __init__(self, model: Any, mask_id: int, shift: int):
        self.model, self.mask_id, self.shift = model, mask_id, shift

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, past: KV | None,
                keep: bool) -> tuple[torch.Tensor, KV | None]:
        return self.model(input_ids=ids).logits[0], None


def load_diffusion_lm(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(model, tokenizer, runner) for a bundled folder or a LLaDA / Dream checkpoint."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = _local_config(source) or {}
    if "diffusion_lm" in config:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
        spec = config["diffusion_lm"]
        return model, tokenizer, LlamaRunner(model, int(spec["mask_token_id"]), int(bool(spec.get("logits_shift"))))
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    model = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=dtype).to(device).eval()
    model_type = str(getattr(model.config, "model_type", "")).lower()
    mask_id = getattr(model.config, "mask_token_id", None) or getattr(tokenizer, "mask_token_id", None)
    shift = 1 if model_type == "dream" else 0
    return model, tokenizer, RemoteRunner(model, int(mask_id if mask_id is not None else LLADA_MASK_ID), shift)


class DiffusionLMBackend(TextBackend):
    """A masked-diffusion LM: the Text tab's backend with LLaDA decoding as its loop."""

    def __init__(self, model_id: str, model: Any, tokenizer: Any, runner: Any,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(model_id, model, tokenizer, device, dtype, draft_id=None)
        self.runner = runner
        self.family = FAMILY

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "DiffusionLMBackend":
        model, tokenizer, runner = load_diffusion_lm(source, device, dtype)
        return cls(model_id, model, tokenizer, runner, device, dtype)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, model_id: str = "in-memory", mask_id: int | None = None,
                   shift: int = 1, **_: Any) -> "DiffusionLMBackend":
        """An in-memory Llama-layout model (tests): bidirectional through the 4D mask."""
        mask_id = mask_id if mask_id is not None else model.config.vocab_size - 1
        return cls(model_id, model, tokenizer, LlamaRunner(model, mask_id, shift))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(kind="masked diffusion LM", mask_token_id=self.runner.mask_id,
                    kv_cache=self.runner.supports_cache)
        return info

    def build_plan(self, request: Request) -> DiffusionDecodingPlan:
        base = super().build_plan(request)
        params = request.params
        gen_length = base.max_new_tokens
        steps = int(params.get("steps") or gen_length)
        block_length = int(params.get("block_length") or DEFAULT_BLOCK_LENGTH)
        if steps > gen_length:
            raise ValidationError(f"{steps} denoising steps for {gen_length} new tokens: a diffusion LM commits at "
                                  f"least one token per step, so use at most {gen_length} steps")
        plan = DiffusionDecodingPlan(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                                     steps=steps, block_length=min(block_length, gen_length))
        plan.decoder = lambda backend, input_ids, state: _decode(backend, plan, input_ids, state)
        return plan


def _decode(backend: DiffusionLMBackend, plan: DiffusionDecodingPlan, input_ids: torch.Tensor,
            state: DecodeState) -> None:
    """The plan's denoising loop; the decided prefix of the answer streams as it grows,
    and decoding stops once an end-of-sequence token is in it (the rest would be dropped)."""

    def on_step(answer: torch.Tensor) -> bool:
        decided = answer.tolist()
        first_mask = next((i for i, t in enumerate(decided) if t == backend.runner.mask_id), len(decided))
        new = decided[len(state.tokens):first_mask]
        return state.emit(new) if new else state.finished

    _, stats = diffusion_generate(backend.runner, input_ids, plan, on_step)
    plan.extra.update(stats.as_extra(input_ids.shape[-1] + plan.max_new_tokens),
                      steps=plan.steps, block_length=plan.block_length,
                      threshold=plan.threshold, factor=plan.factor, cache=plan.cache)
