"""Sparse-vDiT: per-head pattern search, the block-sparse kernel, and the method on tiny Wan.

The compiled flex_attention path is not run here (one compile costs 20-100 s on a busy
2-core machine): its BlockMask is checked block by block against the head masks, the
reference kernel (masked SDPA) runs the method, and ``benchmarks/sparse_vdit_attention.py``
checks the compiled output against the reference on every run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from backends.types import MethodChoice, Request  # noqa: E402
from kernels.sparse_heads import (  # noqa: E402
    HeadPattern, SparseHeadAttention, attention_block_mass, block_mass, flex_block_mask, head_masks, pattern_mask, search_head,
    sparse_head_attention,
)

NB, FRAME_BLOCKS = 8, 2.0  # 8 blocks, a frame every 2 blocks


def _mass(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.sum(dim=1, keepdim=True)


def test_each_pattern_family_is_found_where_the_mass_has_its_shape():
    eye = torch.eye(NB)
    near = _mass(eye + 0.01)  # almost all mass on the query's own block
    found = search_head(near, 0.9, FRAME_BLOCKS)
    assert (found.kind, found.width, found.kept) == ("diagonal", 0, 1 / NB)
    temporal = _mass(pattern_mask(HeadPattern("multi_diagonal", 0), NB, FRAME_BLOCKS).float() + 0.01)
    found = search_head(temporal, 0.9, FRAME_BLOCKS)
    assert (found.kind, found.width) == ("multi_diagonal", 0) and found.kept == 0.5
    stripe = torch.full((NB, NB), 0.01)
    stripe[:, 5] = 1.0
    found = search_head(_mass(stripe), 0.9, FRAME_BLOCKS)
    assert (found.kind, found.stripes) == ("vertical_stripe", (5,))
    assert found.kept == pytest.approx(round(2 / NB - 1 / NB**2, 4))
    assert search_head(_mass(torch.ones(NB, NB)), 0.99, FRAME_BLOCKS).kind == "dense"  # uniform: no cheaper pattern
    assert search_head(near, 1.0, FRAME_BLOCKS).kind == "dense"  # recall 1 keeps every block with any mass


def test_block_mass_rows_sum_to_one_and_the_chunked_form_agrees():
    probs = torch.randn(2, 3, 32, 32).softmax(-1)
    mass = block_mass(probs, 8)
    assert mass.shape == (3, 4, 4)
    assert torch.allclose(mass.sum(-1), torch.ones(3, 4))
    q, k = torch.randn(2, 3, 32, 8), torch.randn(2, 3, 32, 8)
    dense = block_mass((q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1), 8)
    assert torch.allclose(attention_block_mass(q, k, 8, chunk_tokens=16), dense, atol=1e-6)  # two query chunks


def test_flex_block_mask_keeps_exactly_the_head_masks():
    patterns = [HeadPattern("diagonal", 1), HeadPattern("vertical_stripe", 0, (0, 3)), HeadPattern("dense")]
    masks = head_masks(patterns, NB, FRAME_BLOCKS)
    block_mask = flex_block_mask(masks, 16, "cpu")
    assert torch.equal(block_mask.to_dense()[0].bool(), masks)
    assert block_mask.kv_num_blocks.sum() == 0  # no partial blocks: the mask function is never evaluated


def test_reference_kernel_is_dense_attention_when_every_block_is_kept_and_masks_otherwise():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, NB * 4, 8, generator=g) for _ in range(3))
    dense = head_masks([HeadPattern("dense")] * 3, NB, FRAME_BLOCKS)
    assert torch.allclose(sparse_head_attention(q, k, v, dense, 4, backend="torch"),
                          F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    local = head_masks([HeadPattern("diagonal", 0)] * 3, NB, FRAME_BLOCKS)
    out = sparse_head_attention(q, k, v, local, 4, backend="torch")
    # block-diagonal: each block of 4 queries attends to its own 4 keys only
    expected = F.scaled_dot_product_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    assert torch.allclose(out[:, :, :4], expected, atol=1e-6)
    # heads split by pattern: the dense head goes to SDPA untouched, the local one is masked
    mixed = head_masks([HeadPattern("dense"), HeadPattern("diagonal", 0), HeadPattern("dense")], NB, FRAME_BLOCKS)
    split = SparseHeadAttention(mixed, 4, backend="torch")
    assert split.dense_heads.tolist() == [0, 2] and split.sparse_heads.tolist() == [1]
    out = split(q, k, v)
    assert torch.equal(out[:, [0, 2]], F.scaled_dot_product_attention(q[:, [0, 2]], k[:, [0, 2]], v[:, [0, 2]]))
    assert torch.allclose(out[:, 1, :4], expected[:, 1], atol=1e-6)


# ---------------------------------------------------------- the method on tiny Wan (3x8x8 tokens)

PARAMS = dict(block=16, dense_steps=1, recall=0.5, backend="torch")


@pytest.fixture(scope="module")
def wan():
    from backends.manager import BackendManager
    from backends.tiny.dummy_video import register_dummy_video_models

    manager = BackendManager(device="cpu", dtype=torch.float32)
    register_dummy_video_models(manager)
    return manager.get("video", "dummy-wan")


def _request(methods=(), steps=3):
    return Request("video", "dummy-wan", "a red circle", seed=1, params={"steps": steps, "guidance": 3.0},
                   methods=[MethodChoice(name, params) for name, params in methods])


def _frames(result) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in result.output])


def _processors(wan):
    from backends.accel.sta import self_attention_modules

    return [m.processor for m in self_attention_modules(wan.denoiser)]


def test_patterns_cut_the_attention_work_change_the_output_and_remove_cleanly(wan):
    originals = _processors(wan)
    baseline = _frames(wan.run(_request()))
    result = wan.run(_request([("sparse_vdit", PARAMS)]))
    stats = result.method_stats["sparse_vdit"]
    assert stats["calibrated_this_run"] and stats["calibration"]["kind"] == "head_patterns"
    assert stats["calibration"]["grid"] == [3, 8, 8]
    assert stats["kept_fraction"] < 1 and stats["sparse_calls"] > 0
    assert stats["attention_pairs"] < stats["dense_attention_pairs"]
    assert sum(stats["head_patterns"].values()) == 2 * 2  # layers x heads
    assert not np.array_equal(_frames(result), baseline)
    assert _processors(wan) == originals  # the very same objects
    assert np.array_equal(_frames(wan.run(_request())), baseline)
    again = wan.run(_request([("sparse_vdit", PARAMS)])).method_stats["sparse_vdit"]
    assert not again["calibrated_this_run"]  # found once per model and setting in this process


def test_the_dense_pattern_is_the_baseline_exactly(wan):
    baseline = _frames(wan.run(_request()))
    record = wan.run(_request([("sparse_vdit", PARAMS)])).method_stats["sparse_vdit"]
    record = dict(record.get("calibration") or _stored(wan), id=7)
    dense = dict(record, patterns=[[HeadPattern().to_dict()] * 2] * 2)
    choice = MethodChoice("sparse_vdit", PARAMS, calibrations=[dense])
    result = wan.run(_request().replace(methods=[choice]))
    stats = result.method_stats["sparse_vdit"]
    assert stats["calibration_id"] == 7 and stats["kept_fraction"] == 1.0 and stats["sparse_calls"] == 0
    assert np.array_equal(_frames(result), baseline)


def _stored(wan):
    from backends.accel.sparse_vdit import SparseVDiTMethod

    return next(iter(SparseVDiTMethod.found.values()))


def test_the_studio_hands_stored_patterns_back_and_describes_them():
    from studio.calibration import describe, with_stored_calibrations

    record = {"kind": "head_patterns", "id": 3, "patterns": [[HeadPattern("diagonal", 0, kept=0.25).to_dict(),
                                                              HeadPattern().to_dict()]]}

    class History:
        def calibrations(self, model, method):
            return [record] if (model, method) == ("dummy-wan", "sparse_vdit") else []

    request = with_stored_calibrations(History(), _request([("sparse_vdit", {})]))
    assert request.methods[0].calibrations == [record]
    assert describe(record) == "sparse attention patterns: 1 of 2 heads sparse, 62% of key blocks kept"


def test_a_failure_midway_through_the_attach_puts_the_processors_back(wan, monkeypatch):
    import backends.accel.sparse_vdit as sparse_vdit

    wan.run(_request([("sparse_vdit", PARAMS)]))  # patterns found (and kept) first
    originals = _processors(wan)

    def broken(*args, **kwargs):
        raise RuntimeError("hook could not be made")

    monkeypatch.setattr(sparse_vdit, "_grid_recorder", broken)  # after the processors are swapped
    with pytest.raises(RuntimeError):
        wan.run(_request([("sparse_vdit", PARAMS)]))
    assert _processors(wan) == originals
