"""The contract a hub AR-image adapter (``backends/janus.py``, ``backends/emu3.py``) keeps with
the studio and the AR-image methods, written once so every adapter is held to the same checks.

Each adapter's test file keeps one test per check and calls the function here, so a failure
still names the model. The functions take what differs between adapters: the loaded backend,
its token grid (``grid`` a side) and codebook size, and two callables from the test file:

- ``run(backend, methods=(), seed=3, **params)``: a studio run the way that model is asked
  (Emu3's with its negative prompt), methods as ``(name, params)`` pairs;
- ``tokens(backend, loop, seed=0, temperature=0.0)``: one token loop on the pipeline, as
  ``(tokens, forwards)``.

Where an adapter asserts more than the shared check (a stricter bound, its own refusals), the
function returns what it measured and the test file asserts the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.types import MethodChoice, Request, ValidationError

PROMPT = "a red circle at top left on white"
EVERY_METHOD = ([], [MethodChoice("sjd", {"window": 8})], [MethodChoice("lantern", {"k": 8})],
                [MethodChoice("zipar", {"window": 2})], [MethodChoice("gsd", {"k": 8, "group": 4})])
REMOVABLE_METHODS = [("sjd", {"window": 8}), ("lantern", {"k": 8, "delta": 0.3}),
                     ("zipar", {"window": 2}), ("gsd", {"k": 8, "group": 4})]


# -- building and loading -----------------------------------------------------------------------
def saved_tiny_model(tmp_path_factory, name: str, build):
    """A folder holding the tiny random model ``build(folder)`` saves (one thread: the tests
    share the CPU)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp(name) / f"tiny-{name}"
    build(folder)
    return folder


def load_as_the_studio_does(folder):
    """The backend for a folder typed as the model id, loaded the way the studio loads it."""
    from backends.manager import BackendManager

    return BackendManager(device="cpu").get("image", str(folder))


# -- recognition and loading --------------------------------------------------------------------
def check_hub_ids_are_recognised_and_fail_offline_in_one_line(hub_ids, folder, other_kind: str,
                                                              other_hub_id: str) -> None:
    """The hub ids and a saved folder are AR-image sources; offline (conftest sets
    HF_HUB_OFFLINE) a hub id fails in one line pointing at a local folder, and asked for in
    another tab it names the Image tab."""
    from backends.ar_image import is_ar_image_source
    from backends.manager import BackendManager
    from backends.types import ModelLoadError

    assert all(is_ar_image_source(hub_id) for hub_id in hub_ids) and is_ar_image_source(str(folder))
    with pytest.raises(ModelLoadError) as err:
        BackendManager(device="cpu").get("image", hub_ids[0])
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "local folder" in message
    with pytest.raises(ModelLoadError, match="is an image model: choose it in the Image tab"):
        BackendManager(device="cpu").get(other_kind, other_hub_id)


def check_the_studio_paints_every_method(studio, model_id: str, grid: int, run, guidance: float,
                                         **request_fields) -> list:
    """Every AR-image method paints an image of the requested size through ``Studio.generate``
    and lands in the history in order; without a size, the model's own. Returns the outcomes."""
    outcomes = []
    for methods in EVERY_METHOD:
        outcome = studio.generate(Request("image", model_id, PROMPT, seed=1, methods=methods, **request_fields,
                                          params={"width": 40, "height": 32, "guidance": guidance}))
        assert outcome.result.output.size == (40, 32) and np.asarray(outcome.result.output).std() > 0
        assert outcome.result.extra["tokens"] == grid * grid
        outcomes.append(outcome)
    rows = studio.history.query(limit=5)
    assert [r.methods[0]["name"] for r in rows[:4]][::-1] == ["sjd", "lantern", "zipar", "gsd"]
    assert all(r.status == "ok" for r in rows)
    backend = studio.manager.get("image", model_id)
    assert backend.family == "ar-image" and backend.default_size() == (2 * grid, 2 * grid)
    assert run(backend).output.size == (2 * grid, 2 * grid)  # no size asked: the model's own
    return outcomes


def check_a_foreign_format_is_refused_in_one_line(folder, config_json: str) -> str:
    """A folder in the model maker's own (remote-code) format is taken for an AR-image source,
    then refused in one line that does not show the server's path. Returns the message."""
    from backends.ar_image import is_ar_image_source
    from backends.manager import BackendManager
    from backends.types import ModelLoadError

    folder.mkdir()
    (folder / "config.json").write_text(config_json)
    assert is_ar_image_source(str(folder))
    with pytest.raises(ModelLoadError) as err:
        BackendManager(device="cpu").get("image", str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder.parent) not in message
    return message


# -- exactness --------------------------------------------------------------------------------
def check_sjd_is_exact_under_greedy_decoding(backend, tokens) -> list[int]:
    """SJD writes plain decoding's tokens under greedy decoding. Returns its forwards per seed."""
    from backends.accel._ar_decoding import plain_loop
    from backends.accel.sjd import sjd_loop

    counts = []
    for seed in (0, 1):
        plain, _ = tokens(backend, plain_loop, seed)
        sjd, forwards = tokens(backend, lambda s, p: sjd_loop(s, p, 8), seed)
        assert torch.equal(plain, sjd)
        counts.append(forwards)
    return counts


def check_a_row_wide_zipar_window_is_raster_order(backend, grid: int, tokens) -> torch.Tensor:
    """With a window of a whole row, ZipAR (stand-in queries at raster positions under a 4-D
    mask) writes plain decoding's tokens. Returns plain decoding's tokens."""
    from backends.accel._ar_decoding import plain_loop
    from backends.accel.zipar import LoopStats, zipar_loop

    plain, _ = tokens(backend, plain_loop)
    raster, forwards = tokens(backend, lambda s, p: zipar_loop(s, p, grid, LoopStats()))
    assert torch.equal(plain, raster) and forwards == grid * grid
    return plain


def check_zipar_starts_a_row_once_the_one_above_leads_by_two(backend, grid: int, tokens) -> None:
    from backends.accel.zipar import LoopStats, zipar_loop

    _, rows = tokens(backend, lambda s, p: zipar_loop(s, p, 2, LoopStats()))
    assert rows == (grid - 1) * 2 + grid  # a row starts once the one above leads by 2


# -- removal, work done, limits -----------------------------------------------------------------
def check_removing_a_method_restores_the_baseline(backend, method, grid: int, run) -> None:
    from backends.accel._ar_decoding import plain_loop

    before = run(backend, temperature=1.0)
    accelerated = run(backend, [method], temperature=1.0)
    after = run(backend, temperature=1.0)
    assert np.array_equal(np.asarray(before.output), np.asarray(after.output))
    assert accelerated.method_stats[method[0]]["tokens"] == grid * grid
    assert backend.build_plan(Request("image", "x", PROMPT)).decoder is plain_loop


def check_lantern_and_gsd_take_fewer_forwards_than_sjd(backend, grid: int, tokens) -> dict[str, int]:
    """Over three seeds at temperature 1, LANTERN's relaxed and GSD's grouped acceptance take
    fewer forwards than SJD, which takes no more than plain decoding. Returns the totals."""
    from backends.accel._ar_decoding import plain_loop
    from backends.accel.gsd import grouped_accept
    from backends.accel.lantern import latent_neighbours, relaxed_accept
    from backends.accel.sjd import sjd_loop

    neighbours = latent_neighbours(backend.pipe.codebook_vectors().detach(), 8)
    forwards = {"plain": 0, "sjd": 0, "lantern": 0, "gsd": 0}
    for seed in range(3):
        forwards["plain"] += tokens(backend, plain_loop, seed, 1.0)[1]
        forwards["sjd"] += tokens(backend, lambda s, p: sjd_loop(s, p, 8), seed, 1.0)[1]
        forwards["lantern"] += tokens(backend, lambda s, p: sjd_loop(
            s, p, 8, accept=relaxed_accept(neighbours, 0.5)), seed, 1.0)[1]
        forwards["gsd"] += tokens(backend, lambda s, p: sjd_loop(
            s, p, 8, accept=grouped_accept(neighbours, 8)), seed, 1.0)[1]
    assert forwards["lantern"] < forwards["sjd"] <= forwards["plain"] == 3 * grid * grid
    assert forwards["gsd"] < forwards["sjd"]
    return forwards


def check_method_limits_follow_the_codebook_and_grid(backend, grid: int, codes: int, run, refused,
                                                     accepted) -> None:
    """LANTERN's k stays under the codebook, GSD's group within it, ZipAR's window within a
    row; each ``(method, match)`` in ``refused`` fails in one line, ``accepted`` runs."""
    from backends.accel.base import get_method

    lantern, gsd, zipar = (get_method(name).limits(backend) for name in ("lantern", "gsd", "zipar"))
    assert lantern.bounds("k", {}) == (None, codes - 1) and gsd.bounds("group", {}) == (None, codes)
    assert zipar.bounds("window", {}) == (None, grid)
    for method, match in refused:
        with pytest.raises(ValidationError, match=match) as err:
            run(backend, [method])
        assert "\n" not in str(err.value)
    assert run(backend, [accepted]).method_stats[accepted[0]]["tokens"] == grid * grid


def check_the_draft_and_static_cache_methods_are_refused_in_one_line(backend, run) -> None:
    """A hub adapter has no paired draft and no static-cache path: both say so before any work.
    No bundled draft shares its token layout, so speculative is unfit (neither the tuner nor
    the Image tab offers it), and a bundled draft named explicitly is refused without being
    loaded and kept."""
    from backends.accel.base import get_method
    from backends.accel.speculative import AR_DRAFTS

    assert "static-cache" in get_method("static_cache").limits(backend).unfit
    assert "token layout" in get_method("speculative").limits(backend).unfit
    memory = backend.memory_bytes()
    for method, params in [("static_cache", {}), ("speculative", {}),
                           *[("speculative", {"draft": draft}) for draft in AR_DRAFTS]]:
        with pytest.raises(ValidationError) as err:
            run(backend, [(method, params)])
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert AR_DRAFTS and not backend.drafts and backend.memory_bytes() == memory


# -- evaluations counted, cancel ------------------------------------------------------------------
def check_each_forward_counts_as_a_model_evaluation(backend, grid: int, run) -> None:
    plain = run(backend)
    assert plain.model_evals == plain.extra["transformer_forwards"] == grid * grid
    fast = run(backend, [("sjd", {"window": 8})], temperature=1.0)
    assert fast.model_evals == fast.method_stats["sjd"]["transformer_forwards"] < grid * grid


def check_a_cancel_stops_at_the_next_forward(backend, module, request: Request, run) -> None:
    """The API's /run passes no progress callback: the check before every forward of ``module``
    (the language model the adapter calls) is what stops the run, and the next run is as before."""
    from backends.control import CancelToken, RunCancelled

    before = run(backend)
    token, calls = CancelToken(), []

    def cancel_after_three(*_args) -> None:
        calls.append(1)
        if len(calls) == 3:
            token.cancel("test")

    handle = module.register_forward_pre_hook(cancel_after_three)
    try:
        with pytest.raises(RunCancelled):
            backend.run(request, cancel=token)
    finally:
        handle.remove()
    assert len(calls) == 3
    assert np.array_equal(np.asarray(run(backend).output), np.asarray(before.output))
