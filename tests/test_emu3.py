"""Emu3-Gen as an AR image model (``backends/emu3.py``): a tiny random Emu3 built from configs
(as transformers' own tests build theirs) with an offline tokenizer and processor, saved to a
folder and loaded through the studio's path; checked against transformers' own ``generate``
run as its Emu3 docs run image generation (prefix constraints, image-size header, CFG with a
negative prompt), and with every AR-image method across the end-of-line tokens that split
Emu3's grid in the sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import _ar_adapter_contract as contract
from _ar_adapter_contract import PROMPT, REMOVABLE_METHODS
from backends.types import MethodChoice, Request

NEGATIVE = "lowres blurry"
WORDS = "a red green blue yellow circle square triangle at top bottom left right center on white black lowres blurry".split()
SPECIALS = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<image>", "<|image start|>", "<|image end|>",
            "<|image token|>", "<|extra_200|>", "<|extra_201|>", "<pad>"]
GRID, CODES = 6, 48  # 36 codes in 6 rows of 6 (+ 6 end-of-lines) from a 48-code VQ (Emu3-Gen: 90 x 90 of 32,768)
GUIDANCE = 3.0


def build_tiny_emu3(folder) -> None:
    """A random-weight Emu3 (2-layer text model 32 wide, 2-level VQ) and its processor, saved in
    transformers format: what ``BAAI/Emu3-Gen-hf`` is, small. The processor's generation area
    (6 x 8 px a side: a 6x6 grid) goes in its processor_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor,
                              PreTrainedTokenizerFast)

    visual = [f"<|visual token{i:06d}|>" for i in range(CODES)]
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + list("0123456789*,.") + visual)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # "6*6" -> 6 * 6, as Emu3's BPE splits the size header
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<pad>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                              "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
    special = {"pad_token_id": vocab["<pad>"], "bos_token_id": vocab["<|extra_203|>"],
               "eos_token_id": vocab["<|extra_204|>"]}
    config = Emu3Config(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **special},
        vq_config={"codebook_size": CODES, "embed_dim": 8, "latent_channels": 8, "base_channels": 32,
                   "channel_multiplier": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "hidden_size": 32,
                   "temporal_downsample_factor": 1},
        vocabulary_map=vocab)
    torch.manual_seed(0)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights 10x the 0.02-std init: varied, peaked distributions (see test_janus)
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and name.startswith(("model.text_model", "lm_head")):
                weight.mul_(10.0)
    model.save_pretrained(folder)
    processor = Emu3Processor(image_processor=Emu3ImageProcessor(min_pixels=8 * 8, max_pixels=64 * 64),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    saved = folder / "processor_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "image_area": (8 * GRID) ** 2}))


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    return contract.saved_tiny_model(tmp_path_factory, "emu3", build_tiny_emu3)


@pytest.fixture(scope="module")
def backend(emu3_dir):
    return contract.load_as_the_studio_does(emu3_dir)


def _run(backend, methods=(), seed=3, **params):
    request = Request("image", backend.model_id, PROMPT, seed=seed, negative_prompt=NEGATIVE,
                      params={"guidance": GUIDANCE, **params}, methods=[MethodChoice(name, p) for name, p in methods])
    return backend.run(request)


def _tokens(backend, loop, seed=0, temperature=0.0, negative=NEGATIVE):
    from backends.accel._ar_decoding import ARSampling, ARSession

    session = ARSession(backend.pipe, PROMPT, ARSampling(guidance=GUIDANCE, temperature=temperature), seed,
                        negative_prompt=negative)
    return loop(session, None), session.forwards


# -- recognition and loading --------------------------------------------------------------------
def test_emu3_sources_are_recognised_and_the_hub_id_fails_offline_in_one_line(emu3_dir, tmp_path):
    from backends.emu3 import HUB_MODELS, is_emu3_source

    assert not is_emu3_source("BAAI/Emu3-Chat-hf") and not is_emu3_source("stabilityai/sd-turbo")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert not is_emu3_source(str(tmp_path))
    contract.check_hub_ids_are_recognised_and_fail_offline_in_one_line(HUB_MODELS, emu3_dir, "video", HUB_MODELS[0])


def test_the_studio_paints_emu3_images_of_the_requested_size_with_every_method(emu3_dir, studio_factory):
    outcomes = contract.check_the_studio_paints_every_method(studio_factory(), str(emu3_dir), GRID, _run, GUIDANCE,
                                                             negative_prompt=NEGATIVE)
    for outcome in outcomes:
        assert not any("negative prompt" in note for note in outcome.result.notes)  # Emu3 reads it


# -- the same model as transformers' own loop -------------------------------------------------
def _their_image_tokens(pipe, negative_ids):
    """transformers' ``generate`` as its Emu3 docs generate an image: the processor's image
    header, a prefix constraint (visual tokens, an end-of-line after each row, then end of
    frame, image and text) and classifier-free guidance against a negative prompt."""
    layout, tokenizer = pipe.layout, pipe.processor.tokenizer
    inputs = pipe.processor(text=PROMPT, return_for_image_generation=True, image_area=layout.image_area,
                            return_tensors="pt")
    height, width = inputs.pop("image_sizes")[0]
    visual = pipe.model.vocabulary_mapping.image_tokens
    after_row = (width + 1) * height

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - int(torch.nonzero(input_ids == tokenizer.image_wrapper_token_id)[0, 0])
        if offset % (width + 1) == 0:
            return (layout.eol_id,)
        closing = {after_row + 1: tokenizer.eof_token_id, after_row + 2: tokenizer.eoi_token_id,
                   after_row + 3: tokenizer.eos_token_id}
        return (closing.get(offset, tokenizer.pad_token_id),) if offset > after_row else visual

    out = pipe.model.generate(**inputs, max_new_tokens=after_row + 3, prefix_allowed_tokens_fn=allowed,
                              do_sample=False, guidance_scale=GUIDANCE, negative_prompt_ids=torch.tensor([negative_ids]))
    return inputs["input_ids"], out[:, inputs["input_ids"].shape[1]:], (height, width)


@pytest.mark.parametrize("negative", [NEGATIVE, None])  # shorter than the prompt; Emu3's own, longer
def test_greedy_plain_loop_writes_transformers_own_image_tokens(backend, negative):
    """Ours (one batch of two left-padded rows over a DynamicCache, end-of-lines fed by the
    session, logits read at the visual tokens) against transformers' own loop (unbatched
    negative-prompt CFG, prefix constraint), greedy at the same guidance."""
    from backends.accel._ar_decoding import plain_loop

    pipe, layout = backend.pipe, backend.pipe.layout
    negative_ids = layout.negative_ids(negative) if negative else layout.null_ids()
    prompt_ids, theirs, (height, width) = _their_image_tokens(pipe, negative_ids)
    assert prompt_ids[0].tolist() == layout.prompt_ids(PROMPT) and (height, width) == (GRID, GRID)
    assert len(negative_ids) != len(prompt_ids[0])  # the rows differ in length: the pads are exercised
    rows = theirs[0, :-3].view(GRID, GRID + 1)
    assert set(rows[:, -1].tolist()) == {layout.eol_id}  # a row of codes, then its end-of-line
    codes = pipe.model.vocabulary_mapping.convert_bpe2img(rows).flatten()
    ours, forwards = _tokens(backend, plain_loop, negative=negative)
    assert len(set(codes.tolist())) > 3  # not a constant image
    assert torch.equal(ours[0], codes.long()) and forwards == GRID * GRID
    assert torch.equal(pipe._code_head(), pipe.model.lm_head.weight[list(layout.code_ids)])  # the visual rows
    # pixels: transformers' own decode and the image processor's postprocess paint what ours does
    image = pipe.model.decode_image_tokens(image_tokens=theirs, height=height, width=width)
    library = pipe.processor.postprocess(list(image.float()), return_tensors="PIL.Image.Image")
    assert np.array_equal(np.asarray(pipe.decode(ours)[0]), np.asarray(library["pixel_values"][0]))


def test_the_requests_negative_prompt_is_the_guidance_row(backend):
    """The studio's run reads the request's negative prompt (Emu3's own when none is given)."""
    from backends.accel._ar_decoding import plain_loop

    asked = np.asarray(_run(backend, temperature=0.0).output)
    ours, _ = _tokens(backend, plain_loop)
    assert np.array_equal(asked, np.asarray(backend.pipe.decode(ours)[0]))
    request = Request("image", backend.model_id, PROMPT, seed=3, params={"guidance": GUIDANCE, "temperature": 0.0})
    assert not np.array_equal(np.asarray(backend.run(request).output), asked)


def test_a_negative_prompt_without_guidance_is_said_to_be_ignored(backend):
    """At guidance <= 1 there is no guidance row, so the negative prompt changes nothing: the
    run says so instead of dropping it silently (with guidance, no such note)."""
    def note(guidance, negative):
        result = backend.run(Request("image", backend.model_id, PROMPT, seed=3, negative_prompt=negative,
                                     params={"guidance": guidance, "temperature": 0.0}))
        return [n for n in result.notes if "negative prompt" in n], np.asarray(result.output)

    (ignored,), with_negative = note(1.0, NEGATIVE)
    assert "ignored" in ignored and "guidance 1" in ignored and "\n" not in ignored
    assert np.array_equal(with_negative, note(1.0, None)[1])  # it was indeed ignored
    assert note(1.0, None)[0] == [] and note(GUIDANCE, NEGATIVE)[0] == []


def test_sjd_is_exact_under_greedy_decoding_on_emu3(backend):
    forwards = contract.check_sjd_is_exact_under_greedy_decoding(backend, _tokens)
    assert all(count < GRID * GRID for count in forwards)


def test_zipar_with_a_row_wide_window_is_raster_order_across_the_end_of_lines(backend):
    """ZipAR feeds stand-in queries at raster positions under a 4-D mask: on Emu3 the session
    places them past the end-of-lines and widens the mask over them; with a window of a whole
    row it must write plain decoding's tokens."""
    contract.check_a_row_wide_zipar_window_is_raster_order(backend, GRID, _tokens)
    contract.check_zipar_starts_a_row_once_the_one_above_leads_by_two(backend, GRID, _tokens)


def test_a_grid_mask_over_a_row_end_is_widened_to_the_causal_sequence_mask(backend):
    """Tokens fed with their raster positions and a causal mask over grid tokens (as ZipAR
    feeds them) get the distributions the plain feed gets: the session places them past the
    end-of-lines, and the mask lets each end-of-line be seen by what comes after it only."""
    from backends.accel._ar_decoding import ARSampling, ARSession, plain_loop

    tokens = _tokens(backend, plain_loop)[0][0, :GRID + 3].tolist()  # across the first row's end
    outputs = []
    for masked in (False, True):
        session = ARSession(backend.pipe, PROMPT, ARSampling(guidance=GUIDANCE), seed=0, negative_prompt=NEGATIVE)
        session.prefill()
        n, cached = len(tokens), session.cached
        mask = torch.ones(n, cached + n, dtype=torch.bool).tril(cached) if masked else None
        outputs.append(session.forward(tokens, positions=list(range(n)) if masked else None, mask=mask))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


# -- removal, work done, limits -----------------------------------------------------------------
@pytest.mark.parametrize("method", REMOVABLE_METHODS)
def test_removing_a_method_restores_the_emu3_baseline_bit_identically(backend, method):
    contract.check_removing_a_method_restores_the_baseline(backend, method, GRID, _run)


def test_lantern_and_gsd_take_fewer_forwards_than_sjd_on_emu3(backend):
    contract.check_lantern_and_gsd_take_fewer_forwards_than_sjd(backend, GRID, _tokens)


def test_method_limits_follow_the_emu3_codebook_and_grid(backend):
    contract.check_method_limits_follow_the_codebook_and_grid(
        backend, GRID, CODES, _run,
        refused=[(("lantern", {"k": CODES}), "must be"), (("zipar", {"window": GRID + 1}), "must be")],
        accepted=("zipar", {"window": GRID}))


# -- as the Janus loader: drafts and static cache refused, evaluations, cancel, settings, format ----
def test_the_draft_and_static_cache_methods_are_refused_on_emu3_in_one_line(backend):
    """Emu3 has no paired draft and no static-cache path: both say so before any work."""
    contract.check_the_draft_and_static_cache_methods_are_refused_in_one_line(backend, _run)


def test_emu3_runs_count_each_text_model_forward_as_a_model_evaluation(backend):
    contract.check_each_forward_counts_as_a_model_evaluation(backend, GRID, _run)


def test_a_cancel_stops_an_emu3_run_at_the_next_forward_without_a_progress_callback(backend):
    contract.check_a_cancel_stops_at_the_next_forward(
        backend, backend.pipe.model.model.text_model,
        Request("image", backend.model_id, PROMPT, seed=3, params={"guidance": GUIDANCE}), _run)


def test_the_emu3_gen_hub_id_recommends_its_own_guidance_and_size():
    from backends.catalog import recommended_params
    from backends.emu3 import DEFAULT_GUIDANCE, HUB_MODELS

    assert recommended_params(HUB_MODELS[0]) == {"guidance": DEFAULT_GUIDANCE, "width": 720, "height": 720}
    assert recommended_params("baai/emu3-gen-hf")["guidance"] == DEFAULT_GUIDANCE


def test_baais_own_emu3_format_is_refused_in_one_line_naming_the_transformers_repo(tmp_path):
    """``BAAI/Emu3-Gen`` is BAAI's remote code (model_type ``Emu3``), not transformers' ``emu3``."""
    message = contract.check_a_foreign_format_is_refused_in_one_line(
        tmp_path / "Emu3-Gen", '{"model_type": "Emu3", "architectures": ["Emu3ForCausalLM"]}')
    assert "BAAI's own" in message and "BAAI/Emu3-Gen-hf" in message
