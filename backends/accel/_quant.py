"""What the quantization methods share: which layers to quantize, the quantized weight
types torchao lacks on CPU, a per-model cache of quantized weights, and the reversible swap.

A method never replaces a module: it swaps the ``weight`` Parameter of each chosen
``nn.Linear`` for a quantized tensor subclass (torchao's ``Int8Tensor``/``Float8Tensor``,
or the two below) and puts the original Parameter object back on removal. The module tree,
its hooks (other methods hook Linear leaves) and every other weight stay as they were, so
the baseline after removal is the same tensors, bit for bit, and a caching method stacked
on top sees the same modules.

Quantized weights are built once per (model, configuration) and kept in a cache keyed
weakly by the model: toggling a method again swaps the cached copies in (no second
quantization), and unloading the model frees them with it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from backends.base import module_bytes, tensor_bytes  # noqa: F401  (tensor_bytes: re-exported)
from backends.plan import RunHandle

BLOCK_WORDS = ("block", "layer")  # module names of the repeated blocks ("down_blocks", "layers"...)


# ----------------------------------------------------------------------------- bytes

module_weight_bytes = module_bytes  # weights as they run: quantized ones at their stored size


# ----------------------------------------------------------------------------- layer choice

def block_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The model's repeated-block lists in registration order ("down_blocks", "up_blocks";
    "transformer_blocks", "single_transformer_blocks"; "layers"), outermost ones only."""
    lists, taken = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not name:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith(("blocks", "layers")) and len(module) > 0:
            lists.append(module)
            taken.append(name)
    return lists


def edge_blocks(model: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The first ``count`` and last ``count`` blocks of the model (its first block list's
    head, its last block list's tail): the layers quantization hurts most."""
    if count <= 0:
        return []
    lists = block_lists(model)
    if not lists:
        return []
    first, last = list(lists[0]), list(lists[-1])
    return [*first[:count], *last[-count:]]


def is_io_layer(name: str) -> bool:
    """Outside every block: embeddings, the output head, in/out projections, time and
    text embedders. Named by position, so the same rule holds for every family."""
    return not any(word in part for part in name.split(".")[:-1] for word in BLOCK_WORDS)


@dataclass
class LayerChoice:
    """The Linear layers a method quantizes, and those the skip list keeps."""

    targets: dict[str, torch.nn.Linear] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # name -> why it stays in full precision


def choose_linears(model: torch.nn.Module, skip_blocks: int, skip_io: bool,
                   fits: Callable[[torch.nn.Linear], bool] = lambda _m: True) -> LayerChoice:
    """Every ``nn.Linear`` of ``model`` except the skip list (the I/O layers when
    ``skip_io``, the first and last ``skip_blocks`` blocks) and shapes ``fits`` refuses."""
    edges = {id(m) for block in edge_blocks(model, skip_blocks) for m in block.modules()}
    choice = LayerChoice()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module.weight is None:
            continue
        if skip_io and is_io_layer(name):
            choice.kept[name] = "io"
        elif id(module) in edges:
            choice.kept[name] = "edge block"
        elif not fits(module):
            choice.kept[name] = "shape"
        else:
            choice.targets[name] = module
    return choice


# ----------------------------------------------------------------------------- int4 weights

def _torchao_base():
    from torchao.utils import TorchAOBaseTensor

    return TorchAOBaseTensor


def int4_groups(weight: torch.Tensor, group_size: int,
                clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of a [n, k] weight: codes 0..15, and per (row, group)
    the scale and the minimum, so w ~= q * scale + minimum. ``clip`` ([n, k / group]):
    shrink each group's range to that fraction first (AWQ's clipping search)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    if clip is not None:
        low, high = low * clip.unsqueeze(-1), high * clip.unsqueeze(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((groups - low) / scale).round().clamp(0, 15)
    return codes.reshape(n, k).to(torch.int32), scale.reshape(n, -1), low.reshape(n, -1)


def fake_int4(weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """The weight int4 quantization gives back (quantize, then dequantize): what AWQ's
    search scores, and the reference the int4 kernel is tested against."""
    codes, scale, low = int4_groups(weight, group_size, clip)
    n, k = weight.shape
    groups = codes.reshape(n, k // group_size, group_size).float()
    return (groups * scale.unsqueeze(-1) + low.unsqueeze(-1)).reshape(n, k).to(weight.dtype)


def int4_fits(module: torch.nn.Linear, group_size: int) -> bool:
    """Shapes the int4 packing takes: whole groups along the input dimension."""
    n, k = module.weight.shape
    return k % group_size == 0 and k >= group_size


def make_int4_class():
    """``Int4Weight`` is built on torchao's tensor-subclass base (detach, copies, ``.to``
    come from it), created on first use so importing the method files stays cheap."""
    base = _torchao_base()

    class Int4Weight(base):
        """A [n, k] weight stored as group-wise int4: two 4-bit codes per byte, and per
        (row, group) a scale and an offset (w = code * scale + offset). Each matmul
        dequantizes the weight, then runs a dense matmul: the memory saving, not a
        speed-up. Why no int4 kernel: torchao 0.18's int4 needs the mslk package (GPU)
        or a CUDA bfloat16 tinygemm layout, and torch's own CPU kernel
        (``aten._weight_int4pack_mm_for_cpu``) measured 1.1 ms for one token through a
        256x512 layer here, against 15 us dense and about 1 ms for this dequantization,
        and 0.57 s against 4 ms for a 1,024-token prefill (perplexity, calibration).
        ``act_pre_scale``: multiplies the input first (AWQ's 1/s)."""

        tensor_data_names = ["qdata", "scale", "offset"]
        tensor_attribute_names = ["group_size", "shape"]
        optional_tensor_data_names = ["act_pre_scale"]

        def __new__(cls, qdata, scale, offset, group_size, shape, act_pre_scale=None):
            return torch.Tensor._make_wrapper_subclass(cls, shape, device=qdata.device, dtype=scale.dtype,
                                                       requires_grad=False)

        def __init__(self, qdata, scale, offset, group_size, shape, act_pre_scale=None):
            self.qdata, self.scale, self.offset, self.act_pre_scale = qdata, scale, offset, act_pre_scale
            self.group_size = group_size

        @classmethod
        def from_float(cls, weight: torch.Tensor, group_size: int, act_pre_scale: torch.Tensor | None = None,
                       clip: torch.Tensor | None = None):
            codes, scale, low = int4_groups(weight, group_size, clip)
            n, k = weight.shape
            pairs = codes.reshape(n, k // 2, 2).to(torch.uint8)
            qdata = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
            if act_pre_scale is not None:
                act_pre_scale = act_pre_scale.to(weight.dtype)
            return cls(qdata, scale.to(weight.dtype).unsqueeze(-1), low.to(weight.dtype).unsqueeze(-1),
                       group_size, weight.shape, act_pre_scale)

        def dequantize(self) -> torch.Tensor:
            n, k = self.shape
            codes = torch.stack([self.qdata & 15, self.qdata >> 4], -1).reshape(n, k // self.group_size, -1)
            return torch.addcmul(self.offset, codes.to(self.scale.dtype), self.scale).reshape(n, k)

    implements = Int4Weight.implements
    implements_torch_function = Int4Weight.implements_torch_function

    @implements(torch.ops.aten.linear.default)
    @implements_torch_function(torch.nn.functional.linear)
    def _linear(func, types, args, kwargs):
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
        if weight.act_pre_scale is not None:
            x = x * weight.act_pre_scale
        return torch.nn.functional.linear(x, weight.dequantize(), bias)

    return Int4Weight


def make_dynamic_int8_class():
    """``DynamicInt8Weight``: int8 per-row weights run by torch's dynamic-quantization
    kernel on CPU (``quantized::linear_dynamic``, fbgemm: each call quantizes the input
    per tensor to 8 bits, multiplies in int8 and rescales) — the kernel of
    ``torch.ao.quantization.quantize_dynamic``, without replacing the Linear module."""
    base = _torchao_base()

    class DynamicInt8Weight(base):
        tensor_data_names = ["qweight"]
        tensor_attribute_names = ["packed", "shape", "out_dtype"]

        def __new__(cls, qweight, packed, shape, out_dtype):
            return torch.Tensor._make_wrapper_subclass(cls, shape, device=qweight.device, dtype=out_dtype,
                                                       requires_grad=False)

        def __init__(self, qweight, packed, shape, out_dtype):
            self.qweight, self.packed, self.out_dtype = qweight, packed, out_dtype

        @classmethod
        def from_float(cls, weight: torch.Tensor):
            w = weight.detach().float()
            scales = (w.abs().amax(1) / 127).clamp(min=1e-8).double()
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
            return cls(qweight, packed, weight.shape, weight.dtype)

    implements = DynamicInt8Weight.implements
    implements_torch_function = DynamicInt8Weight.implements_torch_function

    @implements(torch.ops.aten.linear.default)
    @implements_torch_function(torch.nn.functional.linear)
    def _linear(func, types, args, kwargs):
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
        out = torch.ops.quantized.linear_dynamic(x.float().contiguous(), weight.packed, True)
        out = out.to(x.dtype)
        return out + bias if bias is not None else out

    return DynamicInt8Weight


_CLASSES: dict[str, Any] = {}


def int4_weight(weight: torch.Tensor, group_size: int, act_pre_scale: torch.Tensor | None = None,
                clip: torch.Tensor | None = None):
    if "int4" not in _CLASSES:
        _CLASSES["int4"] = make_int4_class()
    return _CLASSES["int4"].from_float(weight.detach(), group_size, act_pre_scale, clip)


def dynamic_int8_weight(weight: torch.Tensor):
    if "dyn" not in _CLASSES:
        _CLASSES["dyn"] = make_dynamic_int8_class()
    return _CLASSES["dyn"].from_float(weight.detach())


def torchao_weight(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """``weight`` quantized by torchao's ``quantize_`` with ``config``, on a throwaway
    Linear (the model's own module is never handed to torchao)."""
    from torchao.quantization import quantize_

    n, k = weight.shape
    scratch = torch.nn.Linear(k, n, bias=False, device="meta")
    scratch.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    quantize_(scratch, config)
    return scratch.weight.detach()


# ----------------------------------------------------------------------------- cache and swap

class QuantCache:
    """Quantized weights per model (weakly keyed: unloading the model frees them) and per
    configuration key, at most ``per_model`` configurations each (least recently used
    dropped). ``builds`` counts quantizations, so tests can see a toggle reuse one."""

    def __init__(self, per_model: int = 3):
        self.per_model = per_model
        self.store: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
        self.builds = 0

    def get(self, model: torch.nn.Module, key: Hashable,
            build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
        """The weights for ``key`` and whether they came from the cache."""
        entries = self.store.setdefault(model, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key], True
        weights = build()
        self.builds += 1
        entries[key] = weights
        while len(entries) > self.per_model:
            entries.popitem(last=False)
        return weights, False

    def clear(self, model: torch.nn.Module | None = None) -> None:
        if model is None:
            self.store.clear()
        else:
            self.store.pop(model, None)


CACHE = QuantCache()


def model_key(model: torch.nn.Module, *parts: Hashable) -> tuple:
    """A cache key that changes when the model's weights move or change dtype."""
    first = next(model.parameters(), None)
    where = (str(first.device), str(first.dtype)) if first is not None else ("", "")
    return (*where, *parts)


def direct_forward(module: torch.nn.Linear, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The Linear's forward computed straight from the quantized weight's inner tensors,
    the same operations the tensor subclass would run, without its ``__torch_function__``
    dispatch: on a model this small that dispatch (about 60 us a call here) costs more
    than the matmul it wraps. None: leave the call to the subclass (fp8, GPU kernels)."""
    bias = module.bias
    kind = type(weight).__name__
    if kind == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is None \
            and getattr(weight, "act_pre_scale", None) is None and weight.block_size[-1] == weight.qdata.shape[-1]:
        qdata_t, scale = weight.qdata.t(), weight.scale.flatten()

        def int8_weight_only(x: torch.Tensor) -> torch.Tensor:  # torchao's per-row weight-only path
            m = torch.mm(x.reshape(-1, x.shape[-1]), qdata_t.to(x.dtype))
            y = (m * scale.to(m.dtype)).reshape(*x.shape[:-1], qdata_t.shape[1])
            return (y + bias if bias is not None else y).to(x.dtype)

        return int8_weight_only
    if kind == "DynamicInt8Weight":
        packed = weight.packed

        def dynamic_int8(x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, True).to(x.dtype)
            return y + bias if bias is not None else y

        return dynamic_int8
    if kind == "Int4Weight":
        return lambda x: torch.nn.functional.linear(x, weight.dequantize(), bias) if weight.act_pre_scale is None \
            else torch.nn.functional.linear(x * weight.act_pre_scale, weight.dequantize(), bias)
    return None


def swap_weights(handle: RunHandle, targets: dict[str, torch.nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    """Put each quantized weight in its Linear (and its direct forward, where there is
    one); ``handle`` puts the original Parameter objects and forwards back on removal (in
    reverse order, whatever else was attached)."""
    from backends.accel._patch import ForwardPatch

    for name, module in targets.items():
        original = module._parameters["weight"]
        handle.on_remove(module._parameters.__setitem__, "weight", original)
        module._parameters["weight"] = weights[name]
        forward = direct_forward(module, weights[name])
        if forward is not None:
            handle.on_remove(ForwardPatch(module, lambda _original, f=forward: f).remove)


def quantize_layers(targets: dict[str, torch.nn.Linear],
                    quantize: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each target's weight quantized, as a frozen Parameter ready to swap in."""
    with torch.no_grad():
        return {name: torch.nn.Parameter(quantize(name, module.weight), requires_grad=False)
                for name, module in targets.items()}


def quant_stats(model: torch.nn.Module, choice: LayerChoice, before: int, cached: bool) -> dict[str, Any]:
    """A handle's stats: layers quantized and kept, the network's weight bytes before and
    as run (read with the quantized weights in place)."""
    after = module_weight_bytes(model)
    kept: dict[str, int] = {}
    for why in choice.kept.values():
        kept[why] = kept.get(why, 0) + 1
    return {"layers_quantized": len(choice.targets), "layers_kept": kept, "cache_hit": cached,
            "weight_bytes_before": before, "weight_bytes_after": after,
            "weight_ratio": round(before / after, 3) if after else None}
