"""`reid.variant: official` against the authors' formulas, written out directly (float64, loops).

Reference: silverbulletmdc/PVEN at 0b2e1a8 (docs/method.md §3 gives file and line):

* ``examples/parsing_reid/model.py`` ``ParsingReidModel.forward``: masks without the
  background, ``F.interpolate`` (nearest) to the feature map, ``vis_score = sum M + 1``,
  part features ``sum M F / (sum M + 1)``, a ``BatchNorm1d(4 C)`` local neck whose output
  is the local feature of the loss and of evaluation (``neck_feat: after``).
* ``vehicle_reid_pytorch/loss/triplet_loss.py``: ``normalize`` (x / (||x|| + 1e-12)),
  ``euclidean_dist`` (``clamp(min=1e-12).sqrt()``), ``hard_example_mining`` (the anchor
  itself counts among its positives), ``MarginRankingLoss(margin=0.3)``.
* ``examples/parsing_reid/math_tools.py`` ``clck_dist``: per part ``euclidean_dist(...).sqrt()``
  weighted by ``vis_p * vis_q``, divided by their sum; ``Clck_R1_mAP.compute``: normalised
  features, ``distmat`` squared Euclidean (no root), ranking ``distmat + 0.5 * local ** 2``.
* ``vehicle_reid_pytorch/loss/center_loss.py`` and ``examples/parsing_reid/main.py``:
  ``mean clamp(||f - c_y||^2, 1e-12, 1e12)`` at weight 5e-4, centres stepped by
  ``SGD(lr=0.5)`` on their gradient times 1 / 5e-4.
* ``vehicle_reid_pytorch/utils/pytorch_tools.py`` ``WarmupMultiStepLR`` (warm-up factor 0,
  10 epochs, x 0.1 at 40 and 70, stepped at the start of each epoch).

None of the helpers below calls project code: they are the formulas as the authors' code states them.
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_params
from pipeline.evaluation import DistanceSpec, FeatureSet, evaluate, pair_distance, pven_distance, rank_metrics
from pipeline.reid.distance import pven_distance_torch, spec_for
from pipeline.reid.losses import pven_loss, update_centers
from pipeline.reid.model import PVEN, build_model
from pipeline.reid.train import WarmupMultiStep
from tests.conftest import ROOT

OFFICIAL = load_params(ROOT / "params.yaml", ["reid.variant=official"]).reid


# --------------------------------------------------------------------------- the authors' formulas

def their_normalize(x: list[float]) -> list[float]:
    n = math.sqrt(sum(v * v for v in x))
    return [v / (n + 1e-12) for v in x]


def their_euclidean(x: list[float], y: list[float]) -> float:
    return math.sqrt(max(sum((a - b) ** 2 for a, b in zip(x, y)), 1e-12))


def their_clck(fp: list[list[float]], vp: list[float], fq: list[list[float]], vq: list[float]) -> float:
    """clck_dist for one pair: parts (4, C), vis_score already + 1."""
    num = sum(vp[i] * vq[i] * math.sqrt(their_euclidean(fp[i], fq[i])) for i in range(4))
    return num / sum(vp[i] * vq[i] for i in range(4))


def their_eval_distance(gp, lp, vp, gq, lq, vq, lam=0.5) -> float:
    """Clck_R1_mAP.compute for one pair: raw (neck) features in, feat_norm on."""
    g1, g2 = their_normalize(gp), their_normalize(gq)
    dist_g = sum((a - b) ** 2 for a, b in zip(g1, g2))
    local = their_clck([their_normalize(p) for p in lp], [v + 1 for v in vp],
                       [their_normalize(p) for p in lq], [v + 1 for v in vq])
    return dist_g + lam * local ** 2


def their_triplet(dist: list[list[float]], labels: list[int], margin: float = 0.3) -> float:
    """hard_example_mining + MarginRankingLoss: every anchor counts; it is one of its own positives."""
    losses = []
    for a, la in enumerate(labels):
        ap = max(dist[a][j] for j, lj in enumerate(labels) if lj == la)
        an = min(dist[a][j] for j, lj in enumerate(labels) if lj != la)
        losses.append(max(0.0, ap - an + margin))
    return sum(losses) / len(losses)


def their_id_loss(logits: list[list[float]], labels: list[int], eps: float = 0.1) -> float:
    total = 0.0
    for row, y in zip(logits, labels):
        lse = math.log(sum(math.exp(v) for v in row))
        total += -sum(((1 - eps) * (c == y) + eps / len(row)) * (v - lse) for c, v in enumerate(row))
    return total / len(logits)


def their_center(feats: list[list[float]], labels: list[int], centers: list[list[float]]) -> float:
    d = [min(max(sum((a - b) ** 2 for a, b in zip(f, centers[y])), 1e-12), 1e12) for f, y in zip(feats, labels)]
    return sum(d) / len(d)


def their_lr(epoch: int, base: float = 3.5e-4) -> float:
    """WarmupMultiStepLR.get_lr at last_epoch = epoch (the 1-based epoch being trained)."""
    warm = 1.0
    if epoch < 10:
        alpha = epoch / 10
        warm = 0.0 * (1 - alpha) + alpha
    return base * warm * 0.1 ** bisect.bisect_right([40, 70], epoch)


# --------------------------------------------------------------------------- tests

def test_params_switch_every_piece_and_the_model_file_records_the_distance():
    assert (OFFICIAL.mask_pool, OFFICIAL.local_neck, OFFICIAL.vis_offset, OFFICIAL.part_distance) == (
        "nearest", True, 1.0, "sqrt_euclidean")
    assert (OFFICIAL.loss.normalize_local, OFFICIAL.loss.w_center, OFFICIAL.loss.center_lr) == (True, 5e-4, 0.5)
    spec = spec_for(OFFICIAL, "pven")
    assert (spec.l2norm, spec.squared, spec.local_sq, spec.part_root, spec.vis_offset, spec.lam_value) == (
        True, True, True, True, 1.0, 0.5)
    model = build_model(OFFICIAL, 5)
    assert model.local_neck.num_features == 4 * model.feat_dim and model.centers.shape == (5, model.feat_dim)


def test_model_part_features_are_their_nearest_masks_vis_plus_one_and_local_neck():
    torch.manual_seed(0)
    model = build_model(OFFICIAL, 4).train()
    images = torch.randn(3, 3, 64, 64)
    masks = torch.randint(0, 5, (3, 64, 64))
    masks[0] = 0                                      # nothing visible in image 0
    with torch.no_grad():
        out = model(images, masks)
        fmap = model.backbone(images).double()            # (3, C, 4, 4): a second forward, same weights
    b, c, h, w = fmap.shape
    onehot = torch.stack([(masks == k) for k in range(1, 5)], 1).double()
    small = F.interpolate(onehot, size=(h, w))       # their call: default mode nearest
    vis = small.sum((2, 3)) + 1
    before = torch.einsum("bnhw,bchw->bcn", small, fmap) / vis[:, None, :]   # (B, C, N)
    flat = before.reshape(b, -1)                      # their channel order: c * 4 + n
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    after = ((flat - mean) / torch.sqrt(var + model.local_neck.eps)).view(b, c, 4)   # BN weight 1, bias 0
    np.testing.assert_allclose(out["local"].double().numpy(), after.transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["visibility"].numpy() + 1, vis.numpy())
    assert out["local"][0].abs().sum() > 0, "the neck makes an invisible image's parts non-zero, as theirs"


def test_training_loss_is_their_id_triplet_center_and_local_triplet():
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    glob = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    local = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    vis = torch.randint(0, 6, (6, 4), generator=gen).double()
    vis[1] = 0                                         # an image without any visible part
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    centers = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    out = {"global": glob, "local": local, "visibility": vis, "logits": logits}
    losses = pven_loss(out, labels, OFFICIAL.loss, spec_for(OFFICIAL, "local", normalize=True), centers)

    lab = labels.tolist()
    g, lp, v = glob.tolist(), local.tolist(), vis.tolist()
    d_g = [[their_euclidean(g[i], g[j]) for j in range(6)] for i in range(6)]
    d_l = [[their_clck([their_normalize(p) for p in lp[i]], [x + 1 for x in v[i]],
                       [their_normalize(p) for p in lp[j]], [x + 1 for x in v[j]]) for j in range(6)] for i in range(6)]
    expected = {"id": their_id_loss(logits.tolist(), lab), "gtri": their_triplet(d_g, lab),
                "ltri": their_triplet(d_l, lab), "center": their_center(g, lab, centers.tolist())}
    for name, value in expected.items():   # the ID loss runs in float32 (logits.float())
        assert losses[name].item() == pytest.approx(value, rel=1e-6, abs=1e-9), name
    total = expected["id"] + expected["gtri"] + 5e-4 * expected["center"] + expected["ltri"]
    assert losses["loss"].item() == pytest.approx(total, rel=1e-6)


def test_center_update_is_their_sgd_step_on_the_rescaled_gradient():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 2, 2, 2, 1, 1, 0])
    start = torch.randn(4, 6, generator=gen, dtype=torch.float64)   # class 3 has no image in the batch

    theirs = torch.nn.Parameter(start.clone())
    sgd = torch.optim.SGD([theirs], lr=0.5)
    d2 = ((feats - theirs[labels]) ** 2).sum(1).clamp(min=1e-12, max=1e12)
    (5e-4 * d2.mean()).backward()
    theirs.grad *= 1.0 / 5e-4
    sgd.step()

    ours = start.clone()
    update_centers(ours, feats, labels, lr=0.5)
    np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert torch.equal(ours[3], start[3])


def test_evaluation_distance_and_metrics_are_theirs():
    rng = np.random.default_rng(5)

    def make(n):
        vis = rng.integers(0, 9, (n, 4)).astype(np.float32)
        vis[0] = 0
        return FeatureSet(rng.integers(0, 4, n), rng.integers(0, 3, n), rng.standard_normal((n, 8)).astype(np.float32),
                          rng.standard_normal((n, 4, 6)).astype(np.float32), vis)

    q, g = make(9), make(23)
    theirs = np.array([[their_eval_distance(q.global_feats[i].tolist(), q.part_feats[i].tolist(),
                                            q.visibility[i].tolist(), g.global_feats[j].tolist(),
                                            g.part_feats[j].tolist(), g.visibility[j].tolist())
                        for j in range(len(g))] for i in range(len(q))])
    spec = spec_for(OFFICIAL, "pven")
    assert spec == DistanceSpec(mode="pven", variant="official", part_distance="sqrt_euclidean",
                                visibility_offset=1.0)
    kernel = pven_distance(q, g, spec)
    torch_d = pven_distance_torch(*(torch.from_numpy(np.asarray(x)) for x in (
        q.global_feats, q.part_feats, q.visibility, g.global_feats, g.part_feats, g.visibility)), spec=spec).numpy()
    pairs = pair_distance(q, np.repeat(np.arange(9), 23), g, np.tile(np.arange(23), 9), spec).reshape(9, 23)
    for got in (kernel, torch_d, pairs):
        np.testing.assert_allclose(got, theirs, rtol=2e-5, atol=2e-5)
    # and the metrics of their matrix are the evaluator's (random features: no near ties)
    ref = rank_metrics(theirs, q.ids, g.ids, q.cams, g.cams)
    got = evaluate(q, g, spec)
    assert got.mAP == pytest.approx(ref.mAP, abs=1e-12) and np.array_equal(got.first_rank, ref.first_rank)


def test_multistep_schedule_is_their_warmup_multistep_lr():
    schedule = WarmupMultiStep(steps_per_epoch=7, warmup_epochs=10, milestones=(40, 70), gamma=0.1)
    for epoch in range(1, 121):
        for step in ((epoch - 1) * 7, epoch * 7 - 1):   # constant within the epoch
            assert 3.5e-4 * schedule(step) == pytest.approx(their_lr(epoch), rel=1e-12), epoch


def test_official_pieces_can_be_switched_off_one_at_a_time():
    plain = load_params(ROOT / "params.yaml", ["reid.variant=official", "reid.local_neck=false",
                                               "reid.loss.w_center=0", "reid.mask_pool=max"]).reid
    model = build_model(plain, 3)
    assert model.local_neck is None and not hasattr(model, "centers") and model.mask_pool == "max"
    assert spec_for(plain, "pven").part_root and spec_for(plain, "pven").vis_offset == 1.0
    assert isinstance(PVEN(3, local_neck=False).config["local_neck"], bool)
