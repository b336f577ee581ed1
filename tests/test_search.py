"""``python -m pipeline.search`` for real: indexes of a folder of images and of masked shards,
exact top-k against the dense PVEN distance, torchrun ranks, the ONNX backend, pictures, and
bad input (named files, no half-written index).

Models are random stand-ins (tests.conftest.exported_project); what is checked is the search's
own work: the same features as the pipeline, the exact ranking, the file handling.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import iter_samples, shard_urls
from pipeline.evaluation.dense import pven_distance
from pipeline.evaluation.features import FeatureSet, load_features
from pipeline.evaluation.kernel import DEFAULT_TILE
from pipeline.evaluation.spec import DistanceSpec
from pipeline.evaluation.topk import QUERY_TILE, attention_weights, nearest
from pipeline.search.encoder import Encoder
from tests.conftest import free_port, save_random_models, stage_env

pytestmark = pytest.mark.slow


def search(project: Path, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(torchrun),
                 "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "-m"] if torchrun
                else [sys.executable, "-m"])
    return subprocess.run([*launcher, "pipeline.search", *args], cwd=project, env=stage_env(), capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def photos(exported_project) -> Path:
    """The gallery's images as a folder of files (JPEG and PNG, in sub-folders), as a user has them."""
    folder = exported_project / "photos"
    if not folder.exists():
        for i, sample in enumerate(s for url in shard_urls(exported_project / "data/shards", "gallery")
                                   for s in iter_samples(url)):
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            path = folder / f"cam{i % 2}" / (f"{sample['__key__']}.png" if i % 3 == 0 else f"{sample['__key__']}.jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return folder


def encoder(project: Path, backend: str = "torch") -> Encoder:
    return Encoder.load(backend, model=project / "models/reid/model.pt", parser=project / "models/parser/parser.pt",
                        export_dir=project / "models/export")


def test_an_index_of_the_masked_shards_holds_the_evaluate_stage_embeddings(exported_project):
    done = search(exported_project, "index", "data/shards", "--split", "gallery", "--out", "indexes/gallery")
    assert done.returncode == 0, done.stderr[-3000:]
    index, keys = load_features(exported_project / "indexes/gallery")
    stage, stage_keys = load_features(exported_project / "embeddings/gallery")
    assert keys == stage_keys
    for name in ("global_feats", "part_feats", "visibility", "ids", "cams"):
        np.testing.assert_array_equal(getattr(index, name), getattr(stage, name))
    record = json.loads((exported_project / "indexes/gallery/index.json").read_text())
    assert record["count"] == len(keys) and record["source"]["kind"] == "shards" and record["skipped"] == []


def test_a_query_ranks_the_folder_index_exactly_and_draws_it(exported_project, photos, tmp_path):
    done = search(exported_project, "index", str(photos), "--out", "indexes/photos")
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.*"))
    assert (exported_project / "indexes/photos/keys.txt").read_text().split() == files
    queries = [photos / files[0], photos / files[5]]
    done = search(exported_project, "query", "indexes/photos", *map(str, queries), "--top", "6", "--block-rows", "7",
                  "--png", str(tmp_path / "ranked.png"), "--html", str(tmp_path / "ranked.html"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    # Brute force: the same features, the dense distance on the whole index, a stable sort.
    enc = encoder(exported_project)
    images = [np.array(Image.open(q).convert("RGB")) for q in queries]
    feats = enc.features(images, enc.masks(images))
    index, keys = load_features(exported_project / "indexes/photos")
    q = FeatureSet(np.full(2, -1), None, feats["global"], feats["local"], feats["visibility"])
    dense = pven_distance(q, index, enc.spec, tile=QUERY_TILE)
    for qi, result in enumerate(out["queries"]):
        order = np.argsort(dense[qi], kind="stable")[:6]
        assert [r["key"] for r in result["results"]] == [keys[j] for j in order]
        # Query features of another process (its thread count) may differ in the last bits, and a
        # distance near 0 (an image and itself) is the root of a cancellation: compare squares. The
        # exactness of the ranking itself is pinned below (nearest against the dense matrix).
        got = np.square([r["distance"] for r in result["results"]])
        np.testing.assert_allclose(got, np.square(dense[qi, order]), atol=1e-5 * float(dense[qi].max()) ** 2)
        assert result["results"][0]["key"] == files[[0, 5][qi]]        # an indexed image finds itself first
        weights = attention_weights(feats["visibility"][qi], np.asarray(index.visibility)[order], enc.spec)
        for r, w in zip(result["results"], weights):
            assert list(r["weights"].values()) == pytest.approx(w.tolist(), abs=1e-6)
    assert out["lam"] == enc.spec.lam_value and out["variant"] == "paper"
    assert Image.open(tmp_path / "ranked.png").size[0] > 500
    page = (tmp_path / "ranked.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * (1 + 6) and files[0] in page


def test_two_ranks_build_the_same_index_as_one(exported_project, photos):
    one = search(exported_project, "index", str(photos), "--out", "indexes/one")
    two = search(exported_project, "index", str(photos), "--out", "indexes/two", torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    for name in ("global.npy", "local.npy", "visibility.npy", "keys.txt"):
        assert (exported_project / "indexes/one" / name).read_bytes() == (exported_project / "indexes/two" / name
                                                                          ).read_bytes(), name


def test_the_onnx_backend_queries_a_torch_index_with_the_same_results(exported_project, photos):
    if not (exported_project / "indexes/photos").exists():
        assert search(exported_project, "index", str(photos), "--out", "indexes/photos").returncode == 0
    query = str(next(photos.rglob("*.jpg")))
    results = {}
    for backend in ("torch", "onnx"):
        done = search(exported_project, "query", "indexes/photos", query, "--top", "5", "--backend", backend,
                      "--lam", "1.0")
        assert done.returncode == 0, done.stderr[-3000:]
        results[backend] = json.loads(done.stdout)["queries"][0]["results"]
    assert [r["key"] for r in results["onnx"]] == [r["key"] for r in results["torch"]]
    scale = max(r["distance"] for r in results["torch"]) ** 2
    for a, b in zip(results["onnx"], results["torch"]):   # squares: the first is the image itself, d ~ 0
        assert abs(a["distance"] ** 2 - b["distance"] ** 2) <= 1e-4 * scale


def test_bad_input_names_the_file_and_leaves_no_half_written_index(exported_project, photos, tmp_path):
    good = search(exported_project, "index", str(photos), "--out", str(tmp_path / "index"))
    assert good.returncode == 0
    before = (tmp_path / "index/global.npy").read_bytes()
    folder = tmp_path / "bad"
    shutil.copytree(photos, folder)
    (folder / "notes.jpg").write_text("not an image")
    Image.new("L", (64, 64), 128).save(folder / "grey.png")
    Image.new("RGB", (8, 40), (200, 0, 0)).save(folder / "tiny.png")
    cases = {"notes.jpg": "not a readable image", "grey.png": "a grayscale image (mode L)",
             "tiny.png": "8 x 40 px; expected at least 16 px a side"}
    for name, needle in cases.items():
        done = search(exported_project, "query", str(tmp_path / "index"), str(folder / name))
        assert done.returncode == 2 and f"{folder / name}: {needle}" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    # A failed build keeps the previous index whole; --skip-bad builds it and lists what it left out.
    done = search(exported_project, "index", str(folder), "--out", str(tmp_path / "index"))
    assert done.returncode == 2 and f"{folder / 'grey.png'}: a grayscale image" in done.stderr  # the first, sorted
    assert (tmp_path / "index/global.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "index"]  # no staging parts left behind
    done = search(exported_project, "index", str(folder), "--out", str(tmp_path / "index"), "--skip-bad")
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "index/index.json").read_text())
    assert len(record["skipped"]) == 3 and record["count"] == len(list(photos.rglob("*.*")))
    # An index made with another model, and a missing parser.
    other = tmp_path / "other"
    save_random_models(other, seed=1)
    done = search(exported_project, "query", str(tmp_path / "index"), str(next(photos.rglob("*.jpg"))),
                  "--model", str(other / "models/reid/model.pt"))
    assert done.returncode == 2 and "made with another model" in done.stderr
    done = search(exported_project, "query", str(tmp_path / "index"), str(next(photos.rglob("*.jpg"))),
                  "--parser", str(tmp_path / "missing.pt"))
    assert done.returncode == 2 and f"{tmp_path / 'missing.pt'}: no parser checkpoint" in done.stderr
    done = search(exported_project, "query", str(tmp_path / "bad"), str(next(photos.rglob("*.jpg"))))
    assert done.returncode == 2 and "not a search index" in done.stderr


@pytest.mark.parametrize("spec", [DistanceSpec(mode="pven"), DistanceSpec(mode="pven", variant="official"),
                                  DistanceSpec(mode="global")])
def test_nearest_over_blocks_equals_a_stable_sort_of_the_dense_matrix(spec):
    rng = np.random.default_rng(0)
    n, c = 300, 16

    def features(m: int) -> FeatureSet:
        vis = rng.integers(0, 20, (m, 4)).astype(np.float32)
        return FeatureSet(np.zeros(m), None, rng.normal(size=(m, c)).astype(np.float32),
                          rng.normal(size=(m, 4, c)).astype(np.float32), vis)
    gallery, query = features(n), features(5)
    gallery = FeatureSet.concat([gallery, gallery.subset(slice(0, 40))])     # exact ties: duplicated rows
    for tile in (DEFAULT_TILE, QUERY_TILE):
        dense = pven_distance(query, gallery, spec, tile=tile)
        order = np.argsort(dense, axis=1, kind="stable")[:, :25]
        for rows in (17, 256, 1000):
            blocks = [gallery.subset(slice(s, s + rows)) for s in range(0, len(gallery), rows)]
            dist, idx = nearest(query, blocks, spec, k=25, tile=tile)
            np.testing.assert_array_equal(idx, order)
            np.testing.assert_array_equal(dist, np.take_along_axis(dense, order, 1))
