"""The autoregressive image kind (issue 21): the LlamaGen-style backend and its token-loop
methods (sjd, zipar, lantern, gsd), on tiny random pipelines (no assets needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.accel._ar_decoding import ARSampling, LoopStats, plain_loop, run_loop
from backends.accel.gsd import draft_group, grouped_accept
from backends.accel.lantern import latent_neighbours, relaxed_accept
from backends.accel.sjd import sjd_loop
from backends.accel.zipar import zipar_loop
from backends.ar_image import ARImageBackend
from backends.types import MethodChoice, Request, ValidationError
from _ar_tiny import PROMPT, pixels, run, small_pipeline


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return _tiny()


def _tiny():
    from backends.tiny.ar_image import tiny_random_pipeline

    return tiny_random_pipeline(seed=0)


# -- the backend ------------------------------------------------------------------------------
def test_backend_paints_a_seeded_image_of_the_requested_size(pipe):
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    a, b, c = run(backend, seed=1), run(backend, seed=1), run(backend, seed=2)
    assert a.output.size == (64, 64) and pixels(a).std() > 0
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))
    assert a.extra["tokens"] == 64 and a.extra["transformer_forwards"] == 64 and a.model_evals == 64
    assert run(backend, seed=1, width=32, height=32).output.size == (32, 32)


def test_bundled_folder_loads_through_the_image_backend(pipe, tmp_path):
    from backends.image import ImageBackend

    pipe.save_pretrained(tmp_path / "ar")
    backend = ImageBackend.from_pretrained("local-ar", str(tmp_path / "ar"), torch.device("cpu"), torch.float32)
    assert isinstance(backend, ARImageBackend) and backend.family == "ar-image"
    original = ARImageBackend.from_pipeline(pipe, "local-ar")
    assert np.array_equal(pixels(run(backend)), pixels(run(original)))


def test_an_init_image_is_refused_in_one_line_not_ignored(pipe):
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    with pytest.raises(ValidationError) as err:
        run(backend, init_image="data:image/png;base64,AAAA", strength=0.5)
    assert "img2img" in str(err.value) and "\n" not in str(err.value)


def test_a_size_other_than_the_grid_is_a_resize_and_says_so(pipe):
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    native = run(backend)
    assert native.output.size == (64, 64) and not [n for n in native.notes if "resized" in n]
    big = run(backend, width=256, height=128)
    assert big.output.size == (256, 128)
    assert any("paints 64x64" in n and "resized to 256x128" in n for n in big.notes)


def test_prompt_words_are_put_in_canonical_order(pipe):
    layout = pipe.layout
    assert layout.prompt_ids("white, top left red circle") == layout.prompt_ids(PROMPT)
    assert layout.prompt_ids("") == layout.null_ids()


# -- removal and exactness ----------------------------------------------------------------------
@pytest.mark.parametrize("method", [("sjd", {"window": 8}), ("zipar", {"window": 2}), ("lantern", {"delta": 0.3}),
                                    ("gsd", {"group": 10})])
def test_removing_a_method_restores_the_baseline_bit_identically(pipe, method):
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    before = run(backend)
    accelerated = run(backend, [method])
    after = run(backend)
    assert np.array_equal(pixels(before), pixels(after))
    assert accelerated.method_stats[method[0]]["tokens"] == 64
    assert backend.build_plan(Request("image", "x", PROMPT)).decoder is plain_loop


def test_sjd_is_exact_under_greedy_decoding(pipe):
    greedy = ARSampling(guidance=3.0, temperature=0.0)
    for seed in (0, 1):
        plain, _ = run_loop(plain_loop, pipe, PROMPT, greedy, seed)
        sjd, _ = run_loop(lambda s, p: sjd_loop(s, p, 8), pipe, PROMPT, greedy, seed)
        assert torch.equal(plain, sjd)


def test_sjd_keeps_the_sampling_distribution():
    """Chi-square, SJD against plain sampling, over 600 seeds each on a 2x2-token model:
    the marginal of every position and the joint of the last two (which SJD mostly accepts
    from drafts). A loop that keeps drafts too easily (accepting every draft) fails it."""
    from scipy.stats import chi2_contingency

    pipe = small_pipeline()
    sampling = ARSampling(guidance=2.0, temperature=1.0)
    n, k = 600, pipe.layout.codebook_size
    plain = torch.cat([run_loop(plain_loop, pipe, PROMPT, sampling, seed)[0] for seed in range(n)])
    stats = LoopStats()
    sjd = torch.cat([run_loop(lambda s, p: sjd_loop(s, p, 3, stats=stats), pipe, PROMPT, sampling, seed + 10**6)[0]
                     for seed in range(n)])
    assert stats.accepted > 0.2 * stats.drafted  # the test exercises accepted drafts, not only fresh draws
    columns = [tokens for tokens in plain.T] + [plain[:, 2] * k + plain[:, 3]]
    sjd_columns = [tokens for tokens in sjd.T] + [sjd[:, 2] * k + sjd[:, 3]]
    for a, b in zip(columns, sjd_columns):
        cells = max(int(a.max()), int(b.max())) + 1
        table = np.stack([np.bincount(a.numpy(), minlength=cells), np.bincount(b.numpy(), minlength=cells)])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table).pvalue > 0.001  # 5 tests: a false alarm about once in 200 runs


# -- work done ------------------------------------------------------------------------------------
def test_sjd_and_lantern_need_fewer_forwards_and_lantern_relaxes_acceptance(pipe):
    sampling = ARSampling(guidance=3.0, temperature=1.0)
    neighbours = latent_neighbours(pipe.vq.codes(), 16)
    forwards = {"plain": 0, "sjd": 0, "lantern": 0, "lantern0": 0}
    for seed in range(3):
        forwards["plain"] += run_loop(plain_loop, pipe, PROMPT, sampling, seed)[1]
        sjd_tokens, f = run_loop(lambda s, p: sjd_loop(s, p, 8), pipe, PROMPT, sampling, seed)
        forwards["sjd"] += f
        forwards["lantern"] += run_loop(lambda s, p: sjd_loop(s, p, 8, accept=relaxed_accept(neighbours, 0.5)),
                                        pipe, PROMPT, sampling, seed)[1]
        zero, f0 = run_loop(lambda s, p: sjd_loop(s, p, 8, accept=relaxed_accept(neighbours, 0.0)),
                            pipe, PROMPT, sampling, seed)
        forwards["lantern0"] += f0
        assert torch.equal(zero, sjd_tokens)  # delta 0 is SJD exactly
    assert forwards["sjd"] < forwards["plain"] == 3 * 64
    assert forwards["lantern"] < forwards["sjd"]


def test_gsd_needs_fewer_forwards_than_sjd_and_a_group_of_one_is_sjd(pipe):
    sampling = ARSampling(guidance=3.0, temperature=1.0)
    neighbours = latent_neighbours(pipe.vq.codes(), 16)
    forwards = {"plain": 0, "sjd": 0, "gsd": 0}
    for seed in range(3):
        forwards["plain"] += run_loop(plain_loop, pipe, PROMPT, sampling, seed)[1]
        sjd_tokens, f = run_loop(lambda s, p: sjd_loop(s, p, 8), pipe, PROMPT, sampling, seed)
        forwards["sjd"] += f
        forwards["gsd"] += run_loop(lambda s, p: sjd_loop(s, p, 8, accept=grouped_accept(neighbours, 10)),
                                    pipe, PROMPT, sampling, seed)[1]
        one, _ = run_loop(lambda s, p: sjd_loop(s, p, 8, accept=grouped_accept(neighbours, 1)),
                          pipe, PROMPT, sampling, seed)
        assert torch.equal(one, sjd_tokens)  # group 1 is SJD exactly
    assert forwards["gsd"] < forwards["sjd"] < forwards["plain"] == 3 * 64


def test_gsd_method_with_a_group_of_one_paints_sjd_bit_identically(pipe):
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    sjd = run(backend, [("sjd", {"window": 8})], temperature=1.0)
    one = run(backend, [("gsd", {"window": 8, "group": 1})], temperature=1.0)
    grouped = run(backend, [("gsd", {"window": 8, "group": 10})], temperature=1.0)
    assert np.array_equal(pixels(sjd), pixels(one))
    assert grouped.method_stats["gsd"]["transformer_forwards"] < sjd.method_stats["sjd"]["transformer_forwards"]


def test_gsd_group_is_the_draft_plus_its_most_probable_neighbours():
    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05])
    neighbours = torch.tensor([[1, 3], [0, 2], [3, 1], [2, 4], [3, 2]])
    assert draft_group(p, 0, neighbours, 1).tolist() == [0]
    assert draft_group(p, 0, neighbours, 3).tolist() == [0, 1]  # 2 is probable but not a neighbour of 0
    assert draft_group(p, 4, neighbours, 4).tolist() == [4, 2, 3]
    assert draft_group(p, 4, neighbours, 2).tolist() == [4]  # the top-1 (token 1) is not 4's neighbour


def test_zipar_decodes_rows_in_parallel(pipe):
    sampling = ARSampling(guidance=3.0, temperature=0.0)
    plain, f_plain = run_loop(plain_loop, pipe, PROMPT, sampling, 0)
    raster, f_raster = run_loop(lambda s, p: zipar_loop(s, p, 8, LoopStats()), pipe, PROMPT, sampling, 0)
    assert torch.equal(plain, raster) and f_raster == f_plain == 64  # window = row width: raster order
    _, f4 = run_loop(lambda s, p: zipar_loop(s, p, 4, LoopStats()), pipe, PROMPT, sampling, 0)
    _, f2 = run_loop(lambda s, p: zipar_loop(s, p, 2, LoopStats()), pipe, PROMPT, sampling, 0)
    assert (f4, f2) == (7 * 4 + 8, 7 * 2 + 8)


def test_ar_methods_share_one_slot_and_refuse_diffusion_models(pipe):
    from backends.accel.base import instantiate
    from backends.types import ValidationError

    with pytest.raises(ValidationError, match="cannot be combined"):
        instantiate([MethodChoice("sjd"), MethodChoice("zipar")], "image", "ar-image")
    with pytest.raises(ValidationError, match="does not apply"):
        instantiate([MethodChoice("sjd")], "image", "unet")


# -- the studio around it ------------------------------------------------------------------------
def test_studio_compare_history_and_presets_take_the_ar_model(studio_factory):
    from studio.compare import parse_configs, run_compare
    from studio.presets import Preset

    studio = studio_factory()
    request = Request("image", "dummy-ar", PROMPT, seed=4, params={"guidance": 3.0, "temperature": 0.0, "top_k": 0},
                      methods=[MethodChoice("zipar", {"window": 2})])
    outcome = studio.generate(request)
    row = studio.history.query(limit=1)[0]
    assert (row.model, row.status, row.methods[0]["name"]) == ("dummy-ar", "ok", "zipar")
    assert outcome.result.method_stats["zipar"]["transformer_forwards"] == 7 * 2 + 8
    report = run_compare(studio, Request("image", "dummy-ar", PROMPT, seed=4, params={"temperature": 0.0}),
                         parse_configs("sjd(window=8); zipar(window=8)"), repeats=1, warmup=False)
    rows = {r["config"]: r for r in report.table()}
    assert set(rows) == {"baseline", "sjd(window=8)", "zipar(window=8)"} and not any(r["error"] for r in rows.values())
    # greedy: SJD is exact, and ZipAR with a window of a whole row is raster order
    for config in ("sjd(window=8)", "zipar(window=8)"):
        assert (rows[config]["psnr"], rows[config]["ssim"]) == (100.0, 1.0)
    assert rows["zipar(window=8)"]["model_evals"] == 64 >= rows["sjd(window=8)"]["model_evals"]
    studio.presets.save(Preset("ar-fast", "image", "dummy-ar", {"guidance": 3.0}, [MethodChoice("sjd", {"window": 8})]))
    assert studio.presets.get("ar-fast").methods[0].name == "sjd"


# -- review fixes: devices, guidance <= 1, neighbour cache, cache keyword ------------------------
class _AcceleratorTensor(torch.Tensor):
    """A CPU tensor that says it lives on an accelerator: what a CUDA model's logits are to
    ``ARSession`` on a machine without one (the ops still run here; ``.cpu()`` drops the guise)."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


class _OnAccelerator:
    """The tiny pipeline, its logits handed back as if from an accelerator."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def token_logits(self, *args, **kwargs):
        return self._pipe.token_logits(*args, **kwargs).as_subclass(_AcceleratorTensor)


def test_session_hands_the_loops_cpu_probabilities_whatever_the_models_device(pipe):
    """The loops draw with a CPU ``torch.Generator`` (seeds mean the same image on every
    device) and mix in CPU tensors (sjd's uniform q, the latent neighbours): the session's
    probabilities must be on the CPU, also when the model runs on CUDA."""
    from backends.accel._ar_decoding import ARSession

    sampling = ARSampling(guidance=3.0, temperature=1.0)
    session = ARSession(_OnAccelerator(pipe), PROMPT, sampling, seed=0)
    first = session.prefill()
    assert first.device.type == "cpu" and first.dtype == torch.float32
    assert session.forward([int(first.argmax())]).device.type == "cpu"
    on_cpu, _ = run_loop(lambda s, p: sjd_loop(s, p, 8), pipe, PROMPT, sampling, 0)
    disguised, _ = run_loop(lambda s, p: sjd_loop(s, p, 8), _OnAccelerator(pipe), PROMPT, sampling, 0)
    assert torch.equal(on_cpu, disguised)


def test_guidance_of_one_or_less_runs_one_row_and_reads_the_prompt(pipe):
    """As the Image tab says ("1 or less runs one pass") and as transformers applies CFG
    (only above 1): guidance 0 or 0.5 is no guidance, not a mix that drops the prompt."""
    from backends.accel._ar_decoding import ARSession

    for guidance in (0.0, 0.5, 1.0):
        assert ARSession(pipe, PROMPT, ARSampling(guidance=guidance), seed=0).prefix.shape[0] == 1
    assert ARSession(pipe, PROMPT, ARSampling(guidance=1.5), seed=0).prefix.shape[0] == 2
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    one = pixels(run(backend, guidance=1.0))
    assert np.array_equal(pixels(run(backend, guidance=0.5)), one)
    assert np.array_equal(pixels(run(backend, guidance=0.0)), one)


def test_latent_neighbours_are_computed_once_per_loaded_model_and_k(monkeypatch):
    import backends.accel.lantern as lantern

    calls = []
    compute = lantern.latent_neighbours

    def counted(codes, k):
        calls.append(k)
        return compute(codes, k)

    monkeypatch.setattr(lantern, "latent_neighbours", counted)
    fresh = _tiny()  # its own pipeline: nothing cached on it yet
    backend = ARImageBackend.from_pipeline(fresh, "tiny-ar-random")
    first = run(backend, [("lantern", {"k": 16})], temperature=1.0)
    again = run(backend, [("lantern", {"k": 16})], temperature=1.0)
    run(backend, [("gsd", {"k": 16, "group": 4})], temperature=1.0)
    assert calls == [16]  # the second lantern run and gsd reuse the first run's neighbours
    assert np.array_equal(pixels(first), pixels(again))
    assert first.method_stats == again.method_stats
    run(backend, [("lantern", {"k": 8})], temperature=1.0)
    assert calls == [16, 8]
    codes = fresh.codebook_vectors().detach().cpu()
    assert torch.equal(lantern.neighbours_of(fresh, 16), compute(codes, 16))
    # computed a block of rows at a time: the same neighbours as the whole similarity matrix
    unit = torch.nn.functional.normalize(codes.float(), dim=-1)
    whole = (unit @ unit.t()).fill_diagonal_(float("-inf")).topk(16, dim=-1).indices
    monkeypatch.setattr(lantern, "NEIGHBOUR_ROWS", 24)
    assert torch.equal(compute(codes, 16), whole)


def test_token_loop_passes_the_cache_by_its_current_keyword(pipe):
    """transformers 5.24 deprecates ``past_key_values=`` (removed in 5.40) with a
    FutureWarning on every forward."""
    import warnings

    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(backend, [("sjd", {"window": 8})])
    assert not [w for w in caught if "past_key_values" in str(w.message)]
