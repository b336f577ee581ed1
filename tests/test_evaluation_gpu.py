"""The streaming evaluator with its GEMMs on a GPU (``device="cuda"``): the CPU's metrics, the CPU's counts.

GPU GEMMs round differently from MKL's, so distances agree to float precision and the
metrics to well below a rank swap per thousand queries; the counting itself is exact
(same distances in, same histogram out).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.constants import VARIANTS
from pipeline.evaluation import MODES, DistanceSpec, StreamingEvaluator, pven_distance
from pipeline.evaluation.metrics import BlockRanker, TileCounter, encode_ids
from tests.test_evaluation_streaming import make_problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_metrics_match_the_cpu(mode, variant):
    q, g = make_problem(0, 300, 3000, 80)
    spec = DistanceSpec(mode=mode, variant=variant)
    cpu = StreamingEvaluator(q, g, spec).run()
    gpu = StreamingEvaluator(q, g, spec, device="cuda").run()
    assert gpu.num_queries == cpu.num_queries > 0 and gpu.num_skipped == cpu.num_skipped
    assert abs(gpu.mAP - cpu.mAP) < 2e-3 and np.abs(gpu.cmc - cpu.cmc).max() <= 2 / cpu.num_queries
    # most queries rank identically; a few may swap a near-tie
    assert np.mean(np.isclose(gpu.ap, cpu.ap, rtol=0, atol=1e-6, equal_nan=True)) > 0.95


def test_cuda_counting_equals_cpu_counting():
    q, g = make_problem(1, 64, 700, 30)
    d = torch.as_tensor(pven_distance(q, g, DistanceSpec()))            # (64, 700), one tile
    qc, gc = encode_ids(q.ids, g.ids)
    rows, cols = np.nonzero(qc[:, None] == gc[None, :])
    results = []
    for device, tile in (("cpu", d), ("cuda", d.cuda())):
        ranker = BlockRanker(len(qc), torch.from_numpy(rows), d[rows, cols])
        counter = TileCounter(ranker, 1, d.shape[1], qc, gc, device)
        counter(0, 0, 0, tile)
        counter.flush()
        results.append((ranker.hist.clone(), ranker.num_candidates, ranker.finalize()))
    (h_cpu, n_cpu, f_cpu), (h_gpu, n_gpu, f_gpu) = results
    assert n_cpu > 0 and n_gpu == n_cpu and torch.equal(h_gpu, h_cpu)
    for a, b in zip(f_cpu, f_gpu):
        np.testing.assert_array_equal(a, b)


def test_cuda_bf16_gemms_run_and_stay_close():
    q, g = make_problem(2, 200, 2000, 60)
    cpu = StreamingEvaluator(q, g, DistanceSpec()).run()
    gpu = StreamingEvaluator(q, g, DistanceSpec(), matmul_dtype=torch.bfloat16, device="cuda").run()
    assert gpu.num_queries == cpu.num_queries and abs(gpu.mAP - cpu.mAP) < 2e-2


def test_rerank_on_cuda_is_refused_clearly():
    from pipeline.evaluation.rerank import RerankConfig
    q, g = make_problem(3, 20, 100, 10)
    with pytest.raises(ValueError, match="re-ranking runs on the CPU"):
        StreamingEvaluator(q, g, DistanceSpec(), rerank=RerankConfig(), device="cuda")
