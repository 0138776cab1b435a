"""Janus / Janus-Pro as an AR image model (``backends/janus.py``): a tiny random Janus built
from configs (as transformers' own tests build theirs) with an offline tokenizer and
processor, saved to a folder and loaded through the studio's path; checked against
transformers' own ``generate(generation_mode="image")`` and with every AR-image method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _ar_adapter_contract as contract
from _ar_adapter_contract import PROMPT, REMOVABLE_METHODS
from backends.types import MethodChoice, Request
WORDS = "a red green blue yellow circle square triangle at top bottom left right center on white black".split()
SPECIALS = ["<unk>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<pad>", "<image_placeholder>",
            "<begin_of_image>", "<end_of_image>", "<|User|>:", "<|Assistant|>:"]
# the shape of Janus-Pro's chat template: a user turn, then the assistant's turn opened
CHAT_TEMPLATE = ("{% for m in messages %}<|User|>: {% for c in m['content'] %}{{ c['text'] }}{% endfor %} "
                 "{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}")
GRID, CODES = 6, 64  # 36 image tokens from a 64-code VQ (Janus-Pro: 24 x 24 of 16,384)
GUIDANCE = 3.0


def build_tiny_janus(folder) -> None:
    """A random-weight Janus (2-layer Llama 32 wide, 1-layer SigLIP, 2-level VQ) and its
    processor, saved in transformers format: what ``deepseek-community/Janus-Pro-1B`` is, small."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor,
                              PreTrainedTokenizerFast)

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(  # BOS first, as Janus's Llama tokenizer does
        single="<|begin_of_sentence|> $A", special_tokens=[("<|begin_of_sentence|>", vocab["<|begin_of_sentence|>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_sentence|>", eos_token="<|end_of_sentence|>",
        pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})
    side = 4 * GRID  # the vision tower's patches set the generation grid (JanusConfig: num_patches)
    special = {"pad_token_id": vocab["<pad>"], "bos_token_id": vocab["<|begin_of_sentence|>"],
               "eos_token_id": vocab["<|end_of_sentence|>"]}
    config = JanusConfig(
        text_config={"model_type": "llama", "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "max_position_embeddings": 128, **special},
        vision_config={"image_size": side, "patch_size": 4, "num_image_tokens": GRID * GRID, "hidden_size": 32,
                       "projection_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "mlp_ratio": 2},
        vq_config={"embed_dim": 8, "num_embeddings": CODES, "latent_channels": 8, "base_channels": 32,
                   "channel_multiplier": [1, 1], "projection_dim": 32, "image_token_embed_dim": 32},
        image_token_id=vocab["<image_placeholder>"])
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights 10x the 0.02-std init, and a 40x sharper image head: at the init, every
        # position's hidden state is the prompt's average (one greedy code everywhere) and every
        # distribution near uniform (SJD keeps every draft); these give varied, peaked ones
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and name.startswith(("model.language_model", "model.generation_")):
                weight.mul_(10.0)
        model.model.generation_head.vision_head.weight.mul_(4.0)
    generation = model.generation_config
    for name, value in special.items():
        setattr(generation, name, value)
    generation.generation_kwargs = {"boi_token_id": vocab["<begin_of_image>"]}
    generation.guidance_scale = 5
    model.save_pretrained(folder)
    image_processor = JanusImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3)
    JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                   num_image_tokens=GRID * GRID).save_pretrained(folder)


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return contract.saved_tiny_model(tmp_path_factory, "janus", build_tiny_janus)


@pytest.fixture(scope="module")
def backend(janus_dir):
    return contract.load_as_the_studio_does(janus_dir)


def _run(backend, methods=(), seed=3, **params):
    request = Request("image", backend.model_id, PROMPT, seed=seed, params={"guidance": GUIDANCE, **params},
                      methods=[MethodChoice(name, p) for name, p in methods])
    return backend.run(request)


def _tokens(backend, loop, seed=0, temperature=0.0):
    from backends.accel._ar_decoding import ARSampling, run_loop

    return run_loop(loop, backend.pipe, PROMPT, ARSampling(guidance=GUIDANCE, temperature=temperature), seed)


# -- recognition and loading --------------------------------------------------------------------
def test_janus_sources_are_recognised_and_the_hub_ids_fail_offline_in_one_line(janus_dir, tmp_path):
    from backends.ar_image import is_ar_image_source
    from backends.janus import HUB_MODELS, is_janus_source

    assert not is_janus_source("deepseek-ai/JanusFlow-1.3B") and not is_janus_source("stabilityai/sd-turbo")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_ar_image_source(str(tmp_path))
    contract.check_hub_ids_are_recognised_and_fail_offline_in_one_line(HUB_MODELS, janus_dir, "text", HUB_MODELS[1])


def test_the_studio_paints_janus_images_of_the_requested_size_with_every_method(janus_dir, studio_factory):
    contract.check_the_studio_paints_every_method(studio_factory(), str(janus_dir), GRID, _run, GUIDANCE)


# -- the same model as transformers' own loop -------------------------------------------------
def test_greedy_plain_loop_writes_transformers_own_image_tokens(backend):
    """Ours (DynamicCache, our CFG mix, our embeddings/head calls) against
    ``JanusForConditionalGeneration.generate(generation_mode="image")`` (static cache, its
    ``ClassifierFreeGuidanceLogitsProcessor``), greedy at the same guidance."""
    from backends.accel._ar_decoding import plain_loop

    pipe = backend.pipe
    layout = pipe.layout
    text = pipe.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                                             add_generation_prompt=True)
    inputs = pipe.processor(text=text, generation_mode="image", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == layout.prompt_ids(PROMPT)
    # transformers 5.24 drops generation_kwargs when it loads a generation config: put it back
    pipe.model.generation_config.generation_kwargs = {"boi_token_id": layout.boi_id}
    theirs = pipe.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=GUIDANCE)
    ours, forwards = _tokens(backend, plain_loop)
    assert theirs.shape == (1, GRID * GRID) and len(set(theirs[0].tolist())) > 3  # not a constant image
    assert torch.equal(ours, theirs) and forwards == GRID * GRID
    null = layout.null_ids(layout.prompt_ids(PROMPT))
    assert null[0] == layout.bos_id and null[-1] == layout.boi_id and set(null[1:-1]) == {layout.pad_id}
    # pixels: the image processor's own postprocess (given channels-first arrays, which its PIL
    # backend handles) paints what ours does
    library = pipe.processor.postprocess(list(pipe.vq.decode(theirs).float()), return_tensors="PIL.Image.Image")
    assert np.array_equal(np.asarray(pipe.decode(ours)[0]), np.asarray(library["pixel_values"][0]))


def test_sjd_is_exact_under_greedy_decoding_on_janus(backend):
    forwards = contract.check_sjd_is_exact_under_greedy_decoding(backend, _tokens)
    assert all(count <= GRID * GRID for count in forwards)


# -- removal, work done, limits -----------------------------------------------------------------
@pytest.mark.parametrize("method", REMOVABLE_METHODS)
def test_removing_a_method_restores_the_janus_baseline_bit_identically(backend, method):
    contract.check_removing_a_method_restores_the_baseline(backend, method, GRID, _run)


def test_lantern_and_gsd_take_fewer_forwards_than_sjd_and_zipar_fewer_than_raster(backend):
    forwards = contract.check_lantern_and_gsd_take_fewer_forwards_than_sjd(backend, GRID, _tokens)
    assert forwards["sjd"] < forwards["plain"]  # on Janus SJD itself saves forwards
    contract.check_zipar_starts_a_row_once_the_one_above_leads_by_two(backend, GRID, _tokens)


def test_zipar_with_a_row_wide_window_is_raster_order_through_positions_and_masks(backend):
    """ZipAR feeds stand-in queries at raster positions under a 4-D mask; with a window of a
    whole row it must write plain decoding's tokens: the adapter passes both through."""
    plain = contract.check_a_row_wide_zipar_window_is_raster_order(backend, GRID, _tokens)
    # the positions and the mask reach the model: a token placed a row further on, or one
    # hidden from the prompt, has another distribution
    from backends.accel._ar_decoding import ARSampling, ARSession

    def after_first_token(mask, position=0):
        session = ARSession(backend.pipe, PROMPT, ARSampling(guidance=GUIDANCE), seed=0)
        n = session.prefix.shape[1]
        session.prefill()
        return session.forward([int(plain[0, 0])], positions=[position], mask=None if mask is None else mask(n))

    causal = after_first_token(None)
    assert not torch.allclose(after_first_token(None, position=GRID + 1), causal)  # RoPE reads the position
    assert torch.allclose(after_first_token(lambda n: torch.ones(1, n + 1, dtype=torch.bool)), causal, atol=1e-6)
    only_itself = lambda n: torch.arange(n + 1)[None] == n  # noqa: E731
    assert not torch.allclose(after_first_token(only_itself), causal)


def test_method_limits_follow_the_janus_codebook_and_grid(backend):
    contract.check_method_limits_follow_the_codebook_and_grid(
        backend, GRID, CODES, _run, refused=[(("lantern", {"k": CODES}), "k must be")],
        accepted=("lantern", {"k": CODES - 1}))


def test_the_draft_and_static_cache_methods_are_refused_on_janus_in_one_line(backend):
    """Janus has no paired draft and no static-cache path: both say so before any work."""
    contract.check_the_draft_and_static_cache_methods_are_refused_in_one_line(backend, _run)


# -- review fixes: evaluations counted, cancel without progress, recommended settings, format ----
def test_janus_runs_count_each_language_model_forward_as_a_model_evaluation(backend):
    contract.check_each_forward_counts_as_a_model_evaluation(backend, GRID, _run)


def test_a_cancel_stops_a_janus_run_at_the_next_forward_without_a_progress_callback(backend):
    """The API's /run passes no progress callback: the check before every forward of the
    module actually called (the language model) is what stops it."""
    contract.check_a_cancel_stops_at_the_next_forward(
        backend, backend.pipe.model.model.language_model,
        Request("image", backend.model_id, PROMPT, seed=3, params={"guidance": GUIDANCE}), _run)


def test_the_janus_pro_hub_ids_recommend_janus_own_guidance_and_size():
    """The Image tab's guidance slider always sends a value: the model's own guidance
    reaches a run only as the catalog's recommended setting."""
    from backends.catalog import recommended_params
    from backends.janus import DEFAULT_GUIDANCE, HUB_MODELS

    for hub_id in HUB_MODELS:
        assert recommended_params(hub_id) == {"guidance": DEFAULT_GUIDANCE, "width": 384, "height": 384}
    assert recommended_params("deepseek-community/janus-pro-1b")["guidance"] == DEFAULT_GUIDANCE
    assert recommended_params("someone/Janus-Pro-1B-finetune") == {}


def test_deepseeks_own_janus_format_is_refused_in_one_line_naming_the_transformers_repos(tmp_path, monkeypatch):
    """``deepseek-ai/Janus-Pro-7B`` is DeepSeek's ``multi_modality`` code, not transformers'
    ``janus``: the loader reads the config first and says where the loadable ones are."""
    from transformers import PretrainedConfig
    from backends.manager import BackendManager
    from backends.types import ModelLoadError

    message = contract.check_a_foreign_format_is_refused_in_one_line(
        tmp_path / "Janus-Pro-7B", '{"model_type": "multi_modality", "architectures": ["MultiModalityCausalLM"]}')
    assert "multi_modality" in message
    assert "deepseek-community/Janus-Pro-1B" in message and "deepseek-community/Janus-Pro-7B" in message
    # a hub id: its config.json as the hub would serve it (no hub here)
    deepseek_config = {"model_type": "multi_modality"}
    monkeypatch.setattr(PretrainedConfig, "get_config_dict", classmethod(lambda cls, source, **_: (deepseek_config, {})))
    with pytest.raises(ModelLoadError, match="multi_modality.*deepseek-community/Janus-Pro-1B"):
        BackendManager(device="cpu").get("image", "deepseek-ai/Janus-Pro-7B")


def test_janus_forwards_pass_the_cache_by_its_current_keyword(backend):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(backend, [("sjd", {"window": 8})])
    assert not [w for w in caught if "past_key_values" in str(w.message)]
