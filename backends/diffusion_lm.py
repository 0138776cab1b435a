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
    their own modelling code through ``trust_remote_code`` (``_remote_model_class``, which
    also makes that 4.x-era code load under transformers 5). LLaDA predicts in place and
    its forward refuses any K/V cache, so the cached modes refuse it (``RemoteRunner``);
    Dream predicts shifted (token p from output p - 1) and its forward takes
    ``past_key_values`` with ``position_ids``, so every mode runs on it (``DreamRunner``).
    Checked by hand against their real code (README, diffusion-LM section); the committed
    tests (tests/test_dllm_hub.py) use a tiny remote-code model of ours with their traits.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch

from backends.accel._decoding import DecodeState
from backends.accel._dllm_decoding import KV, DiffusionDecodingPlan, diffusion_generate
from backends.text import TextBackend
from backends.types import ModelLoadError, Request, ValidationError

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


def _cache_for(past: KV | None, keep: bool) -> Any:
    """A transformers cache holding ``past`` (K/V of other positions), or an empty one when
    the forward's own K/V are to be kept, or None."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=past) if past else (DynamicCache() if keep else None)


def _kept(cache: Any, n_new: int) -> KV:
    """The K/V the forward appended for its ``n_new`` tokens (the cache's last entries)."""
    return [(layer.keys[..., -n_new:, :].clone(), layer.values[..., -n_new:, :].clone()) for layer in cache.layers]


class LlamaRunner:
    """The bundled model: a Llama made bidirectional by a 4D all-True mask."""

    supports_cache = True

    def __init__(self, model: Any, mask_id: int, shift: int):
        self.model, self.mask_id, self.shift = model, mask_id, shift

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, past: KV | None,
                keep: bool) -> tuple[torch.Tensor, KV | None]:
        n_past = past[0][0].shape[-2] if past else 0
        cache = _cache_for(past, keep)
        mask = torch.ones(1, 1, ids.shape[1], n_past + ids.shape[1], dtype=torch.bool, device=ids.device)
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=mask,
                         cache=cache, use_cache=cache is not None)
        return out.logits[0], _kept(cache, ids.shape[1]) if keep else None


class RemoteRunner:
    """LLaDA through its own code: whole-sequence forwards only. Its forward asserts
    ``past_key_values is None and not use_cache`` ("The kvcache is not suppotred for MDM."),
    so the cached modes refuse it."""

    supports_cache = False

    def __init__(self, model: Any, mask_id: int, shift: int):
        self.model, self.mask_id, self.shift = model, mask_id, shift

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, past: KV | None,
                keep: bool) -> tuple[torch.Tensor, KV | None]:
        # use_cache given: LLaDA reads config.use_cache when it is None, an attribute the
        # transformers 5 config of its remote code no longer has
        return self.model(input_ids=ids, use_cache=False).logits[0], None


class DreamRunner(RemoteRunner):
    """Dream through its own code, with K/V caches: its forward takes ``position_ids`` and
    ``past_key_values`` (a transformers Cache to which every layer appends its RoPE-rotated
    K/V) and attends with no mask unless given one, so a forward over some positions
    against the cached K/V of the others sees the whole sequence, as the bundled model does."""

    supports_cache = True

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, past: KV | None,
                keep: bool) -> tuple[torch.Tensor, KV | None]:
        cache = _cache_for(past, keep)
        out = self.model(input_ids=ids, position_ids=positions[None], past_key_values=cache,
                         use_cache=cache is not None)
        return out.logits[0], _kept(cache, ids.shape[1]) if keep else None


def load_diffusion_lm(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(model, tokenizer, runner) for a bundled folder or a LLaDA / Dream checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _local_config(source) or {}
    if "diffusion_lm" in config:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
        spec = config["diffusion_lm"]
        return model, tokenizer, LlamaRunner(model, int(spec["mask_token_id"]), int(bool(spec.get("logits_shift"))))
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    model = _remote_model_class(source).from_pretrained(source, trust_remote_code=True, dtype=dtype).to(device).eval()
    if not hasattr(model.config, "use_cache"):  # LLaDA's forward reads it; transformers 5 dropped the default
        model.config.use_cache = False
    model_type = str(getattr(model.config, "model_type", "")).lower()
    mask_id = getattr(model.config, "mask_token_id", None)  # LLaDA 126336, Dream 151666 (their config.json)
    mask_id = mask_id if mask_id is not None else getattr(tokenizer, "mask_token_id", None)
    mask_id = int(mask_id if mask_id is not None else LLADA_MASK_ID)
    if model_type == "dream":  # Dream predicts token p at output p - 1
        return model, tokenizer, DreamRunner(model, mask_id, shift=1)
    return model, tokenizer, RemoteRunner(model, mask_id, shift=0)


def _default_rope_parameters(config: Any, device: Any = None, seq_len: int | None = None,
                             **_: Any) -> tuple[torch.Tensor, float]:
    """Plain RoPE inverse frequencies (no scaling), as transformers 4.x computed them under
    ``ROPE_INIT_FUNCTIONS["default"]``."""
    base = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 1e4)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponents), 1.0


def ensure_default_rope() -> None:
    """Dream's rotary embedding looks up ``ROPE_INIT_FUNCTIONS["default"]``, an entry
    transformers 5 removed (loading fails with KeyError 'default', DreamLM/Dream issue 83);
    put the plain RoPE back under that name when it is missing (additive: no model of the
    library reads it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ROPE_INIT_FUNCTIONS.setdefault("default", _default_rope_parameters)


def _recompute_rope_buffers(model: Any) -> None:
    """Dream keeps its RoPE frequencies in non-persistent ``inv_freq`` buffers computed in
    ``__init__``; transformers 5 builds the model on the meta device and only re-creates
    the buffers of its own classes, so a remote model's are left as uninitialised memory
    (garbage positions, a different answer on every load). Recompute them from the config."""
    for module in model.modules():
        init = getattr(module, "rope_init_fn", None)
        current = getattr(module, "inv_freq", None)
        if init is None or not isinstance(current, torch.Tensor):
            continue
        inv_freq, scaling = init(module.config, current.device, **(getattr(module, "rope_kwargs", None) or {}))
        module.register_buffer("inv_freq", inv_freq.to(current.device), persistent=False)
        module.original_inv_freq = module.inv_freq
        module.attention_scaling = scaling


def _remote_model_class(source: str) -> type:
    """The checkpoint's own ``AutoModel`` class (its auto_map), made loadable by this
    transformers: LLaDA's ``LLaDAModelLM.__init__`` never calls ``post_init()``, which since
    transformers 5 is what sets ``all_tied_weights_keys``, so ``from_pretrained`` fails on it
    (ML-GSAI/LLaDA issue 130), and its ``tie_weights()`` override takes none of the arguments
    transformers 5 passes; the subclass calls ``post_init`` where the class did not and
    forwards ``tie_weights`` to the old signature."""
    from transformers import AutoConfig, PreTrainedModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    ensure_default_rope()
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if not reference:
        raise ModelLoadError("this model's config.json names no AutoModel class in its auto_map, "
                             "so its own code cannot be loaded")
    remote = get_class_from_dynamic_module(reference, source)
    old_tie = "recompute_mapping" not in inspect.signature(remote.tie_weights).parameters

    class RemoteDiffusionLM(remote):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if not hasattr(self, "all_tied_weights_keys"):
                self.post_init()

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            # Dream overrides from_pretrained only to reload generation_config.json as its
            # DreamGenerationConfig, whose validate() transformers 5 calls with arguments it does
            # not take; our decoding reads no Dream generation setting (eos ids come from the
            # plain GenerationConfig the library loads), so the library's loader is used as is.
            model = PreTrainedModel.from_pretrained.__func__(cls, *args, **kwargs)
            _recompute_rope_buffers(model)
            return model

        def tie_weights(self, *args: Any, **kwargs: Any) -> Any:
            # LLaDA's override takes no arguments; transformers 5 passes missing_keys / recompute_mapping
            return remote.tie_weights(self) if old_tie else remote.tie_weights(self, *args, **kwargs)

    RemoteDiffusionLM.__name__ = RemoteDiffusionLM.__qualname__ = remote.__name__
    return RemoteDiffusionLM


class DiffusionLMBackend(TextBackend):
    """A masked-diffusion LM: the Text tab's backend with LLaDA decoding as its loop."""

    unused_params = ()

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
                      threshold=plan.threshold if plan.factor is None else None,  # the factor replaced it
                      factor=plan.factor, cache=plan.cache,
                      # per denoising forward, the tokens it committed (Compare's per-forward plot;
                      # the streamed prefix grows in jumps that are not the model's work)
                      tokens_per_step=list(stats.committed_per_step))
