"""The compiled tile loops (pipeline/evaluation/native.c) give the torch path's bits and counts.

Every test here compares the two paths of the same code (PVEN_NATIVE=1 vs PVEN_NATIVE=0):
distances bitwise, metrics and per-positive tables exactly, on data made to tie.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from pipeline.constants import VARIANTS
from pipeline.evaluation import MODES, DistanceSpec, FeatureSet, StreamingEvaluator, native, pven_distance
from tests.test_evaluation_streaming import make_problem


@pytest.fixture
def use_native(monkeypatch, tmp_path):
    """use_native(flag): switch the path for what follows (the library is built into tmp_path)."""
    monkeypatch.setenv("PVEN_NATIVE_CACHE", str(tmp_path / "native"))

    def switch(flag: bool) -> None:
        monkeypatch.setenv("PVEN_NATIVE", "1" if flag else "0")
        native._load.cache_clear()
        assert native.available() is flag
    yield switch
    native._load.cache_clear()


def tied_problem(seed: int = 3) -> tuple[FeatureSet, FeatureSet]:
    """Features on a coarse grid with repeated images: many exactly equal distances and zeros."""
    q, g = make_problem(seed, 120, 700, 40)
    qg, qp = np.round(q.global_feats * 2) / 2, np.round(q.part_feats * 2) / 2
    gg, gp, gv = np.round(g.global_feats * 2) / 2, np.round(g.part_feats * 2) / 2, g.visibility.copy()
    gg[:50], gp[:50], gv[:50] = qg[:50], qp[:50], q.visibility[:50]   # gallery copies of queries
    gp[60:70] = 0                                                       # zero part vectors
    return (dataclasses.replace(q, global_feats=qg, part_feats=qp),
            dataclasses.replace(g, global_feats=gg, part_feats=gp, visibility=gv))


def both_paths(use_native, fn):
    out = []
    for flag in (False, True):
        use_native(flag)
        out.append(fn())
    return out


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_distances_are_bitwise_the_torch_paths(use_native, mode, variant, matmul_dtype):
    q, g = tied_problem()
    spec = DistanceSpec(mode=mode, variant=variant, lam=None if mode != "pven" else 0.7)
    ref, fast = both_paths(use_native, lambda: torch.as_tensor(pven_distance(q, g, spec, matmul_dtype=matmul_dtype)))
    assert torch.isfinite(ref).all() and ref.unique().numel() < ref.numel()   # the data has ties
    # +0.0 and -0.0 rank alike; every other value must match bit for bit
    assert torch.equal(ref.view(torch.int32) & 0x7FFFFFFF, fast.view(torch.int32) & 0x7FFFFFFF)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_streaming_metrics_and_positive_tables_are_identical(use_native, mode, variant):
    q, g = tied_problem(5)
    spec = DistanceSpec(mode=mode, variant=variant)

    def run():
        return StreamingEvaluator(q, g, spec, q_block=64, g_block=512, range_cap=512, keep_positives=True).run()
    ref, fast = both_paths(use_native, run)
    assert ref.num_queries > 0
    assert fast.same_as(ref) and len(ref.positives) > 0 and fast.positives.same_as(ref.positives)


def test_counting_of_dense_candidate_tiles_is_identical(use_native):
    # random features: most negatives lie below the farthest positive (the dense counting branch)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, 300)
    q = FeatureSet(ids[:60], rng.integers(0, 3, 60), rng.standard_normal((60, 16)).astype(np.float32))
    g = FeatureSet(ids[60:], rng.integers(0, 3, 240), rng.standard_normal((240, 16)).astype(np.float32))
    spec = DistanceSpec(mode="global")
    ref, fast = both_paths(use_native, lambda: StreamingEvaluator(q, g, spec, q_block=32, g_block=64).run())
    assert fast.same_as(ref) and ref.mAP < 0.5


def test_build_is_cached_and_atomic(use_native, tmp_path):
    use_native(True)
    path = native.build()
    assert path.parent == tmp_path / "native" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime      # reused, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]           # no temporary left


def test_required_but_no_compiler_is_a_clear_error(use_native, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PVEN_NATIVE", "1")
    native._load.cache_clear()
    with pytest.raises(native.NativeError, match="no-such-cc"):
        native.lib()


def test_auto_without_compiler_falls_back_to_the_same_results(use_native, monkeypatch, tmp_path):
    q, g = make_problem(2, 80, 300, 30)
    use_native(True)
    ref = StreamingEvaluator(q, g, DistanceSpec()).run()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PVEN_NATIVE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PVEN_NATIVE", "auto")
    native._load.cache_clear()
    with pytest.warns(UserWarning, match="pure-torch"):
        assert not native.available()
    assert StreamingEvaluator(q, g, DistanceSpec()).run().same_as(ref)


def test_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("PVEN_NATIVE", "yes")
    with pytest.raises(ValueError, match="PVEN_NATIVE='yes'"):
        native.lib()


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks CI's settings")
def test_ci_uses_the_compiled_path():
    # CI exports PVEN_NATIVE=1 (.ci/run): there a build failure fails the suite instead of
    # silently falling back to the slower path
    assert os.environ.get("PVEN_NATIVE") == "1" and native.available()
