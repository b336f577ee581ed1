"""PVEN model, distances and losses: hand-computed values, edge cases, gradients, weight files."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision

from pipeline.config import LossConfig
from pipeline.dist.checkpoint import torch_save_atomic
from pipeline.reid.distance import euclidean, pairwise_local_distance
from pipeline.reid.losses import batch_hard_triplet, id_loss, pven_loss
from pipeline.reid.model import (
    PVEN,
    ModelFileError,
    PretrainedError,
    load_model,
    mask_average_pool,
    masks_to_parts,
    model_payload,
)

# Three images, C = 2. Parts: front, back, side, top.
#   p: front (0, 0) area 2, side (1, 0) area 1;            back, top invisible
#   q: front (3, 4) area 1, back (1, 1) area 2, side (1, 1) area 3; top invisible
#   r: back (2, 0) area 1 only: no visible part in common with p
FEATS = torch.tensor([
    [[0., 0.], [0., 0.], [1., 0.], [0., 0.]],
    [[3., 4.], [1., 1.], [1., 1.], [0., 0.]],
    [[0., 0.], [2., 0.], [0., 0.], [0., 0.]],
])
VIS = torch.tensor([[2., 0., 1., 0.], [1., 2., 3., 0.], [0., 1., 0., 0.]])


def test_local_distance_paper_by_hand():
    d, common = pairwise_local_distance(FEATS, VIS, FEATS, VIS, "paper")
    # p-q: common front (2*1) and side (1*3): a = 2/5, 3/5; |(0,0)-(3,4)| = 5, |(1,0)-(1,1)| = 1
    assert d[0, 1].item() == pytest.approx(2 / 5 * 5 + 3 / 5 * 1, abs=1e-6)
    # q-r: only back in common (2*1): |(1,1)-(2,0)| = sqrt(2)
    assert d[1, 2].item() == pytest.approx(math.sqrt(2), abs=1e-6)
    # p-r: nothing in common -> exactly 0 and flagged
    assert d[0, 2].item() == 0.0 and not common[0, 2] and not common[2, 0]
    assert common[0, 1] and common[1, 2]
    assert torch.allclose(d, d.t()) and d.diagonal().abs().max() < 1e-5


def test_local_distance_official_by_hand():
    d, common = pairwise_local_distance(FEATS, VIS, FEATS, VIS, "official")
    assert common.all(), "v + 1: every pair has a common part"
    # Weights (v_p + 1)(v_q + 1) = front 3*2, back 1*3, side 2*4, top 1*1 (sum 18). Unit features:
    # p = [0, 0, (1,0), 0]; q = [(.6,.8), (s,s), (s,s), 0], s = 1/sqrt 2; per part the square root
    # of the Euclidean distance (front: zero vs unit vector -> 1; top: two zero vectors -> the
    # floors, sqrt(sqrt(1e-12)) = 1e-3).
    s = 1 / math.sqrt(2)
    side = math.hypot(1 - s, s)
    expected = (6 * 1.0 + 3 * 1.0 + 8 * math.sqrt(side) + 1 * 1e-3) / 18
    assert d[0, 1].item() == pytest.approx(expected, abs=1e-6)


def test_losses_by_hand_for_three_images():
    labels = torch.tensor([0, 0, 1])
    glob = torch.tensor([[0., 0.], [3., 0.], [0., 1.]])
    # Global: anchor p: d_ap 3, d_an 1 -> 2.3; anchor q: 3 - sqrt(10) + 0.3; r has no positive.
    loss_g, stats = batch_hard_triplet(euclidean(glob, glob), labels, 0.3)
    assert loss_g.item() == pytest.approx((2.3 + (3 - math.sqrt(10) + 0.3)) / 2, abs=1e-5)
    assert int(stats["anchors"]) == 2
    # Local: p's only negative (r) shares no part with it -> p does not count; q: 2.6 - sqrt 2 + 0.3.
    d, common = pairwise_local_distance(FEATS, VIS, FEATS, VIS)
    loss_l, stats = batch_hard_triplet(d, labels, 0.3, valid=common)
    assert loss_l.item() == pytest.approx(2.6 - math.sqrt(2) + 0.3, abs=1e-5)
    assert int(stats["anchors"]) == 1
    # ID loss with smoothing 0.1 over 2 classes: -(0.95 log p_y + 0.05 log p_other).
    logits = torch.tensor([[2., 0.], [0., 1.], [1., 1.]])
    expected = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        logp = [x - math.log(sum(math.exp(v) for v in row)) for x in row]
        expected += -(0.95 * logp[y] + 0.05 * logp[1 - y]) / 3
    assert id_loss(logits, labels, 0.1).item() == pytest.approx(expected, abs=1e-6)
    # Weighted total.
    out = {"logits": logits, "global": glob, "local": FEATS, "visibility": VIS}
    cfg = LossConfig(w_id=0.5, w_gtri=2.0, w_ltri=3.0)
    losses = pven_loss(out, labels, cfg)
    total = 0.5 * losses["id"] + 2.0 * losses["gtri"] + 3.0 * losses["ltri"]
    assert losses["loss"].item() == pytest.approx(total.item(), abs=1e-6)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_no_common_part_and_invisible_parts_give_finite_loss_and_gradients(variant):
    labels = torch.tensor([0, 0, 1, 1])
    # Images 0/1 (id 0) see only the front, 2/3 (id 1) only the back: positives share a part,
    # but no image shares one with any negative, so no local-triplet anchor counts.
    local = torch.zeros(4, 4, 3)
    local[0, 0], local[1, 0], local[2, 1], local[3, 1] = torch.tensor([[1., 2, 3], [1, 2, 3], [0, 1, 0], [0, 1, 0]])
    vis = torch.zeros(4, 4)
    vis[0, 0] = vis[1, 0] = vis[2, 1] = vis[3, 1] = 4.0
    glob = torch.tensor([[1., 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])  # identical pairs: distance 0
    out = {name: t.clone().requires_grad_(True) for name, t in
           {"logits": torch.zeros(4, 2), "global": glob, "local": local, "visibility": vis}.items()}
    losses = pven_loss(out, labels, LossConfig(), variant)
    losses["loss"].backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    for name, t in out.items():
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
    if variant == "paper":
        assert losses["ltri"].item() == 0.0, "no negative shares a part: no anchor counts"


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_local_distance_gradcheck(variant):
    gen = torch.Generator().manual_seed(0)
    fa = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    fb = torch.randn(4, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    va = torch.tensor([[3., 0, 2, 0], [0, 5, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    vb = torch.tensor([[2., 0, 0, 1], [0, 0, 4, 0], [1, 2, 3, 4], [0, 0, 0, 7]], dtype=torch.float64)
    # Includes invisible parts and pairs with no common part (a1-b0, a1-b1, a0-b3, ...).
    assert torch.autograd.gradcheck(lambda a, b: pairwise_local_distance(a, va, b, vb, variant)[0], (fa, fb))


def test_masks_max_vs_nearest_pooling_and_mask_average_pooling():
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 0, 0] = 1          # one front pixel in cell (0, 0): max pooling keeps it
    masks[0, 8:, :] = 3         # side covers the bottom half
    parts_max = masks_to_parts(masks, (2, 2), "max")
    parts_nearest = masks_to_parts(masks, (2, 2), "nearest")
    assert parts_max.shape == (1, 4, 2, 2)
    assert parts_max[0, 0].tolist() == [[1, 0], [0, 0]] and parts_nearest[0, 0].sum() <= 1
    assert parts_max[0, 2].tolist() == [[0, 0], [1, 1]] and parts_max[0, 1].sum() == 0
    fmap = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # C=2: [[0,1],[2,3]] and [[4,5],[6,7]]
    local, vis = mask_average_pool(fmap, parts_max)
    assert vis.tolist() == [[1., 0., 2., 0.]]
    assert local[0, 0].tolist() == [0., 4.]             # front: cell (0, 0)
    assert local[0, 2].tolist() == [2.5, 6.5]           # side: mean of the bottom row
    assert local[0, 1].tolist() == [0., 0.]             # invisible back: zero, not NaN


def test_model_outputs_and_last_stride():
    torch.manual_seed(0)
    model = PVEN(5, "resnet18", last_stride=1).eval()
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    out = model(images, masks)
    assert out["global"].shape == (2, 512) and out["neck"].shape == (2, 512)
    assert out["logits"].shape == (2, 5) and out["local"].shape == (2, 4, 512) and out["visibility"].shape == (2, 4)
    assert out["visibility"].max() <= 16, "64 px with last stride 1: a 4 x 4 map (16 cells)"
    assert model.classifier.bias is None and not model.neck.bias.requires_grad
    assert PVEN(5, "resnet18", last_stride=2).backbone(images).shape[-1] == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(images, masks)
    assert all(v.dtype == torch.float32 for v in out16.values())


def test_pretrained_state_dict_loads_and_bad_files_fail_clearly(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    model = PVEN(3, "resnet18", pretrained=str(path))
    assert torch.equal(model.backbone[0].weight, net.conv1.weight)
    assert torch.equal(model.backbone[7][1].conv2.weight, net.layer4[1].conv2.weight)

    with pytest.raises(PretrainedError, match=r"missing\.pt not found"):
        PVEN(3, "resnet18", pretrained=str(tmp_path / "missing.pt"))
    other = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
    with pytest.raises(PretrainedError, match=r"r34\.pt does not fit.*unexpected keys.*layer"):
        PVEN(3, "resnet18", pretrained=str(other))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match=r"cannot read .*junk\.pt"):
        PVEN(3, "resnet18", pretrained=str(junk))


def test_model_file_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(1)
    model = PVEN(4, "resnet18").eval()
    payload = model_payload(model, model.state_dict(), [7, 9, 11, 12],
                            {"variant": "paper", "part_distance": "euclidean", "vis_offset": 0.0,
                             "attention": "common_visible"}, (64, 64))
    torch_save_atomic(payload, tmp_path / "model.pt")
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["class_vids"] == [7, 9, 11, 12] and meta["image_size"] == [64, 64]
    x, m = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))
    assert torch.equal(model(x, m)["neck"], loaded(x, m)["neck"])
    with pytest.raises(ModelFileError, match="nope.pt: no ReID model file.*train_reid"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="junk.pt: not a loadable torch file"):
        load_model(tmp_path / "junk.pt")
