"""ReID evaluation: exact ranking metrics, PVEN distances, streaming evaluation, protocols, re-ranking.

Quick use::

    from pipeline.evaluation import FeatureSet, DistanceSpec, evaluate
    q = FeatureSet(q_ids, q_cams, q_global, q_parts, q_vis)      # (N,), (N,), (N, Cg), (N, 4, Cp), (N, 4)
    g = FeatureSet(g_ids, g_cams, g_global, g_parts, g_vis)
    m = evaluate(q, g, DistanceSpec(mode="pven"))                 # exact, O(block) memory
    m.mAP, m.mINP, m.rank(1), m.summary()

Modules: :mod:`.metrics` (``rank_metrics`` on a dense matrix, tie rule), :mod:`.distance`
(Euclidean / PVEN distances, ``pven_distance_torch`` for losses), :mod:`.streaming`
(``StreamingEvaluator``), :mod:`.protocols` (VeRi-776, VehicleID, VERI-Wild, synthetic),
:mod:`.rerank` (k-reciprocal re-ranking).
"""
from .distance import (DEFAULT_TILE, MODES, VARIANTS, DistanceSpec, FeatureSet, euclidean_distance,
                       pair_distance, pven_distance, pven_distance_torch)
from .metrics import RankMetrics, rank_metrics
from .protocols import (PROTOCOLS, VERIWILD_SUBSETS, ProtocolResult, evaluate_protocol, evaluate_synthetic,
                        evaluate_vehicleid, evaluate_veri776, evaluate_veriwild, vehicleid_split)
from .rerank import RerankConfig, RerankProvider, rerank_memory_estimate
from .streaming import StreamingEvaluator, evaluate

__all__ = ["DEFAULT_TILE", "MODES", "VARIANTS", "DistanceSpec", "FeatureSet", "euclidean_distance",
           "pair_distance", "pven_distance", "pven_distance_torch", "RankMetrics", "rank_metrics",
           "PROTOCOLS", "VERIWILD_SUBSETS", "ProtocolResult", "evaluate_protocol", "evaluate_synthetic",
           "evaluate_vehicleid", "evaluate_veri776", "evaluate_veriwild", "vehicleid_split",
           "RerankConfig", "RerankProvider", "rerank_memory_estimate", "StreamingEvaluator", "evaluate"]
