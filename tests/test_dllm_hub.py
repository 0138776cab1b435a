"""The hub path of the diffusion-LM kind (LLaDA / Dream through ``trust_remote_code``),
on a tiny remote-code model written here (their code is not ours to ship).

``REMOTE_CODE`` below is a small bidirectional transformer saved in a temp folder with a
config.json whose ``model_type`` is ``llada`` or ``dream`` and whose ``auto_map`` points at
it, so the studio loads it exactly as it loads the real checkpoints. It reproduces the
traits of their code that the loader has to handle (checked by hand against the real
modelling files, see the README's diffusion-LM section):

* both: RoPE frequencies in a non-persistent ``inv_freq`` buffer looked up through
  ``ROPE_INIT_FUNCTIONS["default"]`` (Dream; gone in transformers 5);
* ``llada``: no ``post_init()`` in ``__init__``, a ``tie_weights()`` without arguments,
  ``config.use_cache`` read when ``use_cache`` is None, an assertion refusing any K/V
  cache, logits in place (token p from output p);
* ``dream``: a ``from_pretrained`` override
  that reloads a generation config whose ``validate()`` has the 4.x signature,
  ``past_key_values`` (a transformers Cache each layer appends to) with ``position_ids``,
  shifted logits (token p from output p - 1).

Each model adds a large bonus to a known answer token per position (``answer_ids``), so
the decoded answer is known: a runner that reads the logits with the wrong shift decodes
the neighbouring answer tokens instead, and the test says so.
"""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)

from backends.types import MethodChoice, ModelLoadError, Request, ValidationError  # noqa: E402

REMOTE_CODE = '''
"""A tiny bidirectional transformer with {kind}-style remote code (FastGen Studio tests)."""
import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

KIND = "{kind}"


class TinyConfig(PretrainedConfig):
    model_type = KIND

    def __init__(self, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 rope_theta=10000.0, answer_ids=(1,), answer_bonus=0.0, use_cache=False, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.rope_theta, self.answer_ids, self.answer_bonus = rope_theta, list(answer_ids), answer_bonus
        super().__init__(use_cache=use_cache, **kwargs)


class TinyGenerationConfig(GenerationConfig):
    def validate(self, is_init=False):  # the 4.x signature
        pass


class Rotary(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.rope_kwargs = config, {{}}
        self.rope_init_fn = ROPE_INIT_FUNCTIONS["default"]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        angles = position_ids[:, None, :, None].float() * self.inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        first, second = x.chunk(2, -1)
        return x * cos + torch.cat([-second, first], -1) * sin


class Layer(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.index, self.heads = index, config.num_attention_heads
        self.norm = nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp = nn.Sequential(nn.LayerNorm(config.hidden_size), nn.Linear(config.hidden_size, 2 * config.hidden_size),
                                 nn.GELU(), nn.Linear(2 * config.hidden_size, config.hidden_size))
        self.rotary = Rotary(config)

    def forward(self, h, position_ids, cache):
        b, n, d = h.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm(h)).chunk(3, -1))
        q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        if cache is not None:
            k, v = cache.update(k, v, self.index)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)
        h = h + self.out(att.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(h)


class TinyModel(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "model"
    _tied_weights_keys = ["lm_head.weight"] if KIND == "dream" else None

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if KIND == "dream":
            self.post_init()  # LLaDA's __init__ never calls it

    def tie_weights(self):  # LLaDA's override takes no arguments
        pass

    def can_generate(self):  # as LLaDA's: gives the model a generation config
        return True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if KIND == "dream":  # Dream reloads its own generation config class
            model.generation_config = TinyGenerationConfig.from_pretrained(args[0])
        return model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        if KIND == "llada":
            assert past_key_values is None and not use_cache, "no K/V cache for a masked diffusion model"
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, position_ids, past_key_values)
        logits = self.lm_head(h)
        shift = 1 if KIND == "dream" else 0  # Dream: output p predicts token p + 1
        answer = torch.tensor(self.config.answer_ids, device=h.device)
        wanted = answer[(position_ids + shift) % len(answer)]
        bonus = nn.functional.one_hot(wanted, self.config.vocab_size).to(logits.dtype) * self.config.answer_bonus
        return MaskedLMOutput(logits=logits + bonus)
'''

GEN = 12
PROMPT = "def draw(shape):"


def remote_class(folder):
    """The folder's AutoModel class as the loader sees it (built on a real device here)."""
    from backends.diffusion_lm import _remote_model_class

    return _remote_model_class(str(folder))


def remote_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), trust_remote_code=True)


def build_folder(root, kind: str):
    """A hub-style folder: config.json (model_type, auto_map), the remote code, a tokenizer,
    random weights."""
    from safetensors.torch import save_file

    from backends.tiny.dummy import byte_level_tokenizer

    folder = root / f"tiny-{kind}"
    folder.mkdir()
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|mask|>"]})
    tokenizer.save_pretrained(folder)
    mask = tokenizer.convert_tokens_to_ids("<|mask|>")
    plain = [i for i in range(len(tokenizer)) if i not in (mask, tokenizer.eos_token_id)]
    answer = [plain[(7 * i + 3) % len(plain)] for i in range(11)]  # neighbours differ: a wrong shift shows
    (folder / "tiny_dllm.py").write_text(REMOTE_CODE.format(kind=kind))
    config = {"model_type": kind, "architectures": ["TinyModel"], "vocab_size": len(tokenizer),
              "auto_map": {"AutoConfig": "tiny_dllm.TinyConfig", "AutoModel": "tiny_dllm.TinyModel"},
              "mask_token_id": mask, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id,
              "answer_ids": answer, "answer_bonus": 12.0}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    torch.manual_seed(0)
    model = remote_class(folder)(remote_config(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder, answer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {kind: build_folder(root, kind) for kind in ("llada", "dream")}


@pytest.fixture(scope="module")
def manager():
    from backends.manager import BackendManager

    return BackendManager(device="cpu", dtype=torch.float32)


def run(backend, methods=(), **params):
    params = {"max_new_tokens": GEN, "block_length": 4, **params}
    request = Request("text", backend.model_id, PROMPT, seed=0, params=params,
                      methods=[MethodChoice(n, p) for n, p in methods])
    return backend.run(request)


def expected_answer(backend, answer):
    start = backend.encode_prompt(PROMPT).shape[-1]
    return [answer[p % len(answer)] for p in range(start, start + GEN)]


@pytest.mark.parametrize("kind,shift,cached", [("llada", 0, False), ("dream", 1, True)])
def test_remote_code_loads_as_a_diffusion_lm_and_reads_its_logits_with_the_right_shift(folders, manager, kind,
                                                                                        shift, cached):
    from backends.diffusion_lm import DiffusionLMBackend

    folder, answer = folders[kind]
    backend = manager.get("text", str(folder))
    assert isinstance(backend, DiffusionLMBackend) and backend.family == "diffusion-lm"
    info = backend.describe()
    assert info["mask_token_id"] == json.loads((folder / "config.json").read_text())["mask_token_id"]
    assert (backend.runner.shift, backend.runner.supports_cache, info["kv_cache"]) == (shift, cached, cached)
    want = expected_answer(backend, answer)
    result = run(backend)
    assert result.extra["output_token_ids"] == want and result.extra["denoising_forwards"] == GEN
    backend.runner.shift = 1 - shift  # read the logits the other model's way: the answer slides by one
    try:
        assert run(backend).extra["output_token_ids"] != want
    finally:
        backend.runner.shift = shift


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_remote_rope_buffers_are_computed_not_left_uninitialised(folders, manager, kind):
    """transformers 5 builds a remote model on the meta device and leaves its non-persistent
    buffers empty; the loaded model must give the logits of one built directly."""
    folder, _ = folders[kind]
    backend = manager.get("text", str(folder))
    direct = remote_class(folder)(remote_config(folder)).eval()
    direct.load_state_dict(backend.model.state_dict())
    ids = backend.encode_prompt(PROMPT)
    with torch.inference_mode():
        # called as LLaDA's generate.py calls it: no use_cache (its forward then reads config.use_cache)
        torch.testing.assert_close(backend.model(input_ids=ids).logits, direct(input_ids=ids, use_cache=False).logits)


def test_llada_refuses_the_cached_modes_in_one_line(folders, manager):
    backend = manager.get("text", str(folders["llada"][0]))
    assert len(run(backend, [("fast_dllm", {"cache": "none", "threshold": 0.5})]).extra["output_token_ids"]) == GEN
    for method in [("dkv_cache", {}), ("fast_dllm", {"cache": "dual"})]:
        with pytest.raises(ValidationError) as err:
            run(backend, [method])
        assert "\n" not in str(err.value) and "cache" in str(err.value)


def test_dream_runs_the_cached_modes_through_its_own_cache_interface(folders, manager):
    backend = manager.get("text", str(folders["dream"][0]))
    runner = backend.runner
    x = torch.tensor([5, 9, 14, 3, runner.mask_id, runner.mask_id, 22, runner.mask_id, 7])
    with torch.inference_mode():
        full, kv = runner.forward(x[None], torch.arange(len(x)), None, True)
        query, others = torch.tensor([2, 4, 5, 7]), torch.tensor([0, 1, 3, 6, 8])
        past = [(k.index_select(-2, others), v.index_select(-2, others)) for k, v in kv]
        part, _ = runner.forward(x[query][None], query, past, False)
    torch.testing.assert_close(part, full[query], rtol=1e-4, atol=1e-4)
    base = run(backend)
    exact = run(backend, [("dkv_cache", {"refresh_interval": 1})])
    assert exact.extra["output_token_ids"] == base.extra["output_token_ids"]
    for method in [("fast_dllm", {"cache": "dual", "threshold": 1.0}), ("dkv_cache", {})]:
        cached = run(backend, [method])
        assert cached.extra["positions_computed"] < base.extra["positions_computed"]
        assert len(cached.extra["output_token_ids"]) == GEN


def test_compare_and_history_take_a_remote_code_model(folders, studio_factory):
    from studio.compare import parse_configs, run_compare

    studio = studio_factory()
    for kind, configs in [("llada", "fast_dllm(threshold=0.5, cache=none)"), ("dream", "fast_dllm(threshold=0.5)")]:
        model_id = str(folders[kind][0])
        request = Request("text", model_id, PROMPT, seed=0, params={"max_new_tokens": GEN, "block_length": 4})
        outcome = studio.generate(request)
        assert len(outcome.result.extra["output_token_ids"]) == GEN
        report = run_compare(studio, request, parse_configs(configs), repeats=1, warmup=False)
        assert all(row.error is None for row in report.rows)
        assert report.rows[0].quality["token_agreement"] == 1.0
        assert studio.history.count(compare_group=report.group, status="ok") == 2


def test_a_broken_local_folder_fails_in_one_line_without_hub_wording(tmp_path, manager):
    """A folder the tokenizer loads from, whose remote code is missing or names no model:
    one line, the folder as typed, no hub wording or hub URL built from a server path."""
    import shutil

    from backends.tiny.dummy import byte_level_tokenizer

    def broken(name: str, auto_map: dict) -> str:
        folder = tmp_path / name
        folder.mkdir()
        byte_level_tokenizer().save_pretrained(folder)
        if name == "no-auto-model":  # the config class exists; the model class is not named
            shutil.copy(build_folder(tmp_path, "dream")[0] / "tiny_dllm.py", folder / "tiny_dllm.py")
        (folder / "config.json").write_text(json.dumps({"model_type": "dream", "auto_map": auto_map}))
        return str(folder)

    missing = broken("missing-code", {"AutoConfig": "missing.Config", "AutoModel": "missing.Model"})
    unnamed = broken("no-auto-model", {"AutoConfig": "tiny_dllm.TinyConfig"})
    for folder, says in ((missing, "missing.py"), (unnamed, "names no AutoModel")):
        with pytest.raises(ModelLoadError) as err:
            manager.get("text", folder)
        message = str(err.value)
        assert says in message, message
        assert "\n" not in message and "model hub" not in message and "huggingface.co" not in message
