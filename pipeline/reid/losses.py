"""PVEN's training losses (docs/method.md §4).

``L = w_id L_id + w_gtri L_tri_g + w_ltri L_tri_l`` on one P x K batch of B images:

* ``L_id``: cross entropy with label smoothing on the classifier logits (B, N).
* ``L_tri_g``: batch-hard triplet with margin ``margin_g`` on the Euclidean distance
  of the global features f_g (B, C) (before the BN neck, as in BNNeck models).
* ``L_tri_l``: batch-hard triplet with margin ``margin_l`` on the local distance
  D_l of :mod:`pipeline.reid.distance` (with the variant's flags: ``official`` takes
  the authors' ``ParsingTripletLoss`` on normalised part features, v + 1 and the
  per-part sqrt of the Euclidean distance).
* ``L_center`` (``w_center`` > 0; ``official``: 5e-4): the authors' ``CenterLoss``
  (``vehicle_reid_pytorch/loss/center_loss.py``): ``mean_b clamp(||f_g,b - c_y_b||^2,
  1e-12, 1e12)`` on the raw global feature. Its gradient reaches the network; the
  centres move by :func:`update_centers`, their ``SGD(lr=center_lr)`` step on the
  gradient rescaled by ``1 / w_center`` (``examples/parsing_reid/main.py``).

Batch-hard: for each anchor, the farthest positive (same identity, not itself) and
the nearest negative; loss ``max(0, d_ap - d_an + margin)`` averaged over anchors.
For the local loss a pair that shares no visible part (D_l undefined, set to 0) is
left out of the mining, so it is neither a "perfect" positive nor an impossible
negative; an anchor left without a positive or a negative does not count. When no
anchor counts, the loss is an exact 0 that still carries a (zero) gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.evaluation.spec import DistanceSpec
from pipeline.reid.distance import euclidean, pairwise_local_distance


def id_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Label-smoothed cross entropy: logits (B, N), labels (B,) in 0..N-1 -> scalar."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def batch_hard_triplet(distances: torch.Tensor, labels: torch.Tensor, margin: float,
                       valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-hard triplet loss of a (B, B) distance matrix; ``valid`` (B, B) bool limits the pairs mined.

    Returns (loss, stats) with 0-d tensor stats ``active`` (share of counted anchors
    with a positive loss) and ``anchors`` (counted anchors); tensors, so that nothing
    waits on the device here.
    """
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=distances.device)
    pos = same & ~eye
    neg = ~same
    if valid is not None:
        pos, neg = pos & valid, neg & valid
    inf = torch.tensor(float("inf"), dtype=distances.dtype, device=distances.device)
    # where() with a constant routes no gradient to the pairs not mined.
    d_ap = torch.where(pos, distances, -inf).max(1).values
    d_an = torch.where(neg, distances, inf).min(1).values
    counted = pos.any(1) & neg.any(1)
    # Uncounted anchors hold +-inf: select before subtracting (inf - inf would be NaN).
    zero = torch.zeros((), dtype=distances.dtype, device=distances.device)
    gap = torch.where(counted, d_ap, zero) - torch.where(counted, d_an, zero) + margin
    per_anchor = torch.where(counted, F.relu(gap), zero)
    n = counted.sum()
    # An exact 0 (with a zero gradient) when no anchor counts; no host sync either way.
    loss = per_anchor.sum() / n.clamp(min=1)
    stats = {"active": ((per_anchor > 0) & counted).sum() / n.clamp(min=1), "anchors": n}
    return loss, stats


def center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each feature (B, C) to its class centre (N, C), clamped as the authors do.

    The centres are constants here (a buffer): only the features get a gradient.
    """
    diff = features - centers.detach().to(features.dtype)[labels]
    return (diff * diff).sum(1).clamp(min=1e-12, max=1e12).mean()


@torch.no_grad()
def update_centers(centers: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, lr: float,
                   distributed: bool = False) -> None:
    """One step of the authors' centre optimiser, in closed form, on the global batch.

    Their ``SGD(center_loss.parameters(), lr)`` steps on the gradient of
    ``w * L_center`` times ``1 / w``, i.e. on ``dL_center/dc_k = (2/B) sum_{b: y_b = k}
    (c_k - f_b)`` (B the batch, plain SGD: no momentum, no weight decay). With DDP the
    per-class sums are all-reduced and B is the global batch, so every rank applies
    the same update a single process would apply to the whole batch.
    """
    dtype = torch.promote_types(centers.dtype, torch.float32)   # bf16 centres (DeepSpeed) step in fp32
    f, c = features.detach().to(dtype), centers.to(dtype)
    diff = torch.zeros_like(c).index_add_(0, labels, c[labels] - f)
    count = torch.tensor([float(len(labels))], device=c.device)
    if distributed:
        dist.all_reduce(diff)
        dist.all_reduce(count)
    centers.copy_(c - lr * 2.0 * diff / count)


def pven_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg,
              local_spec: DistanceSpec | str = "paper",
              centers: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All losses and their weighted sum for the model outputs ``out`` (see model.PVEN).

    ``cfg`` is a resolved :class:`pipeline.config.LossConfig`; ``local_spec`` gives the
    local distance's flags (:func:`pipeline.reid.distance.spec_for` of the run's config
    with ``normalize=cfg.normalize_local``, or a variant name); ``centers`` (N, C) are the centre-loss
    centres (needed when ``cfg.w_center`` > 0). Returns ``loss`` (the total, to
    back-propagate) and the unweighted components ``id``, ``gtri``, ``ltri``, ``center``
    (0 without centres). Every component is always computed (a weight of 0 gives zero
    gradients, not unused parameters, which DDP would reject).
    """
    l_id = id_loss(out["logits"], labels, cfg.label_smoothing)
    l_g, _ = batch_hard_triplet(euclidean(out["global"], out["global"]), labels, cfg.margin_g)
    d_l, common = pairwise_local_distance(out["local"], out["visibility"], out["local"], out["visibility"],
                                          local_spec)
    l_l, _ = batch_hard_triplet(d_l, labels, cfg.margin_l, valid=common)
    total = cfg.w_id * l_id + cfg.w_gtri * l_g + cfg.w_ltri * l_l
    w_center = cfg.w_center or 0.0   # an unresolved LossConfig (None) has no centre loss
    if w_center > 0 and centers is None:
        raise ValueError("reid.loss.w_center > 0 needs the model's centres (PVEN(centers=True))")
    l_c = center_loss(out["global"], labels, centers) if centers is not None else torch.zeros_like(l_id)
    if w_center > 0:
        total = total + w_center * l_c
    return {"loss": total, "id": l_id, "gtri": l_g, "ltri": l_l, "center": l_c}
