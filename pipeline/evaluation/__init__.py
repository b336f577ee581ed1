"""ReID evaluation, features in and metrics out: exact streaming metrics, PVEN distances,
dataset protocols, re-ranking. It never imports the model, shards or torch.distributed
(docs/architecture.md).

Quick use::

    from pipeline.evaluation import FeatureSet, DistanceSpec, evaluate
    q = FeatureSet(q_ids, q_cams, q_global, q_parts, q_vis)      # (N,), (N,), (N, Cg), (N, 4, Cp), (N, 4)
    g = FeatureSet(g_ids, g_cams, g_global, g_parts, g_vis)
    m = evaluate(q, g, DistanceSpec(mode="pven"))                 # exact, O(block) memory
    m.mAP, m.mINP, m.rank(1), m.summary()

    from pipeline.evaluation.bootstrap import interval, paired_difference
    interval(m.ap, q_ids)                          # mAP with its 95% identity-bootstrap interval
    paired_difference(m.ap, other.ap, q_ids)       # mAP(m) - mAP(other) on the same resamples

Modules: :mod:`.features` (``FeatureSet``, embedding folders), :mod:`.spec`
(``DistanceSpec``: which distance), :mod:`.kernel` (the tiled GEMM kernel),
:mod:`.dense` (dense matrices on that kernel), :mod:`.reference` (float64 pair
distances), :mod:`.metrics` (``rank_metrics`` on a dense matrix, tie rule, block
counting), :mod:`.provider` / :mod:`.tiled` (distance providers), :mod:`.streaming`
(``StreamingEvaluator``), :mod:`.rerank` (k-reciprocal re-ranking), :mod:`.protocols`
(VeRi-776, VehicleID, VERI-Wild, synthetic), :mod:`.bootstrap` (identity-bootstrap
intervals and paired differences), :mod:`.crossview` (metrics by query-positive view
difference, from the evaluation's positive table), :mod:`.report` (the evaluate
stage's metrics, per-query rows and pictures). :mod:`.bootstrap` and :mod:`.crossview`
are imported from their modules, not re-exported here, so code that only needs the
evaluator (in-loop validation) does not depend on them.
"""
from .dense import euclidean_distance, pven_distance
from .features import FeatureSet, load_features
from .kernel import DEFAULT_TILE
from .metrics import PositiveTable, RankMetrics, rank_metrics, subset_metrics
from .protocols import (
                        PROTOCOLS,
                        ProtocolResult,
                        evaluate_protocol,
                        evaluate_synthetic,
                        evaluate_vehicleid,
                        evaluate_veri776,
                        evaluate_veriwild,
                        vehicleid_split,
)
from .reference import pair_distance
from .rerank import RerankConfig, RerankProvider, rerank_memory_estimate
from .spec import MODES, DistanceSpec
from .streaming import StreamingEvaluator, evaluate

__all__ = ["DEFAULT_TILE", "MODES", "DistanceSpec", "FeatureSet", "load_features", "euclidean_distance",
           "pair_distance", "pven_distance", "RankMetrics", "PositiveTable", "rank_metrics", "subset_metrics",
           "PROTOCOLS", "ProtocolResult", "evaluate_protocol", "evaluate_synthetic",
           "evaluate_vehicleid", "evaluate_veri776", "evaluate_veriwild", "vehicleid_split",
           "RerankConfig", "RerankProvider", "rerank_memory_estimate", "StreamingEvaluator", "evaluate"]
