"""The indexed shard reader: the same samples, order and distribution as WebDataset's tar walk, and its checks.

The references below are the readers as they were before the sidecar index (WebDataset's
``tarfile_to_samples`` in the same pipelines); the new readers must give the same keys,
urls and bytes, batch for batch, for every (rank, world size, loader workers, epoch) tried.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
import webdataset as wds

from pipeline.data import shards
from pipeline.data.shards import (
    ShardIndexError,
    ShardOptions,
    ShardReadError,
    TrainStream,
    eval_pipeline,
    index_path,
    index_tar,
    iter_samples,
    read_manifest,
    read_shard,
    shard_samples,
    shard_urls,
    walk_tar,
    write_shards,
    write_tar,
)
from tests.test_shards import make_records, rank_info

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine


def raw(sample: dict) -> dict:
    return sample


def wds_eval_pipeline(urls, info=None) -> wds.DataPipeline:
    """``eval_pipeline`` before the index: WebDataset's tar walk."""
    if info is not None:
        urls = info.share(urls)
    return wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.split_by_worker, wds.tarfile_to_samples(),
                            wds.map(raw))


class WdsTrainStream(TrainStream):
    """``TrainStream`` before the index: WebDataset's tar walk, all else the same."""

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        seed = shards._stream_seed(self.seed, epoch, self.rank)
        return wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, worker_seed=shards._worker_id, deterministic=True),
            wds.tarfile_to_samples(),
            functools.partial(shards._seeded_shuffle, bufsize=self.shuffle_buffer, seed=seed),
            wds.map(self.map_fn),
            self.batch_fn,
            wds.map(self.collate_fn),
        )


def loaded(pipeline, workers: int) -> list[dict]:
    """Every sample a DataLoader with ``workers`` processes yields, in the order it yields them."""
    return list(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """Uneven shards: 23 train samples in 5 shards, 11 gallery in 3; every other sample has a mask."""
    root = tmp_path_factory.mktemp("reader")
    write_shards(make_records(root / "raw", n_train=23, n_gallery=11), root / "shards",
                 ShardOptions(samples_per_shard=5, min_shards=3), seed=0)
    return root / "shards"


@pytest.fixture(scope="module")
def unindexed_dir(shard_dir, tmp_path_factory) -> Path:
    """The same shards without their sidecars, as the shard stage wrote them before the index."""
    out = tmp_path_factory.mktemp("old") / "shards"
    shutil.copytree(shard_dir, out, ignore=shutil.ignore_patterns("*" + shards.INDEX_SUFFIX))
    return out


def test_every_tar_gets_a_sidecar_that_matches_its_header_walk(shard_dir):
    manifest = read_manifest(shard_dir)
    for split in ("train", "query", "gallery"):
        for url, info in zip(shard_urls(shard_dir, split), manifest["splits"][split]["shards"]):
            side, data = json.loads(index_path(url).read_text()), Path(url).read_bytes()
            assert (side["tar"], side["size"], side["sha256"]) == (Path(url).name, len(data), info["sha256"])
            assert side["crc32"] == zlib.crc32(data)
            assert [(k, {e: (o, n) for e, o, n in m}) for k, m in side["samples"]] == walk_tar(url)
    assert not list(shard_dir.parent.glob("**/.*tmp*")), "no temporary files left behind"


@pytest.mark.parametrize("rank, world, workers", [(0, 1, 0), (1, 2, 0), (0, 2, 2), (2, 3, 1), (0, 1, 3)])
def test_eval_pipeline_reads_what_webdataset_reads(shard_dir, unindexed_dir, rank, world, workers):
    for folder in (shard_dir, unindexed_dir):
        urls = shard_urls(folder, "train")
        info = None if world == 1 else rank_info(rank, world)
        new = loaded(eval_pipeline(urls, map_fn=raw, info=info), workers)
        assert new == loaded(wds_eval_pipeline(urls, info), workers)
        assert new and all(s["__url__"] in urls and "jpg" in s and "json" in s for s in new)


@pytest.mark.parametrize("rank, workers, epoch", [(0, 0, 0), (1, 0, 2), (0, 2, 0), (1, 2, 1), (3, 3, 5)])
def test_train_stream_draws_what_webdataset_draws(shard_dir, rank, workers, epoch):
    urls = shard_urls(shard_dir, "train")
    kw = {"batch_size": 4, "batches_per_epoch": 7, "seed": 3, "rank": rank, "num_workers": workers,
          "shuffle_buffer": 6, "map_fn": raw}
    new = list(TrainStream(urls, **kw).epoch(epoch))
    assert len(new) == 7 and all(len(b) == 4 for b in new)  # 28 samples of 23: resampled
    assert new == list(WdsTrainStream(urls, **kw).epoch(epoch))


def test_odd_member_names_are_grouped_as_webdataset_groups_them(tmp_path):
    """A tar from another tool (no sidecar): metadata, folders, upper-case exts, names without a dot."""
    path = tmp_path / "odd.tar"
    names = ["__meta__", "a.jpg", "a.JSON", "dir/b.x.png", "dir/b.json", "nodot", "c.d.e", "a.txt"]
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE  # not a file: skipped
        tar.addfile(folder)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    ours = list(shard_samples([{"url": str(path)}]))
    assert ours == list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))
    assert [s["__key__"] for s in ours] == ["a", "dir/b", "c", "a"] and ours[1]["x.png"] == b"dir/b.x.png"


def test_json_only_reads_use_the_index_and_match_whole_reads(shard_dir, unindexed_dir):
    for folder in (shard_dir, unindexed_dir):
        url = shard_urls(folder, "gallery")[0]
        whole = list(iter_samples(url))
        assert [{"__key__": s["__key__"], "json": s["json"]} for s in whole] == list(iter_samples(url, ("json",)))
        assert index_tar(url) == walk_tar(url)


def copy_shards(shard_dir: Path, tmp_path: Path) -> list[str]:
    shutil.copytree(shard_dir, tmp_path / "s")
    return shard_urls(tmp_path / "s", "train")


def test_a_tar_that_changed_after_indexing_is_an_error_naming_both_files(shard_dir, tmp_path):
    grown, flipped, *_ = copy_shards(shard_dir, tmp_path)
    with open(grown, "ab") as f:
        f.write(b"\0" * 512)
    for read in (index_tar, lambda u: list(read_shard(u))):
        with pytest.raises(ShardIndexError, match=re.escape(f"{index_path(grown)}: records ")):
            read(grown)
    data = bytearray(Path(flipped).read_bytes())
    offset, _ = index_tar(flipped)[0][1]["jpg"]
    data[offset + 100] ^= 0xFF  # same size, other bytes
    Path(flipped).write_bytes(bytes(data))
    changed = re.escape(f"{index_path(flipped)}: records crc32 ") + ".* but " + re.escape(f"{flipped} sums to")
    with pytest.raises(ShardIndexError, match=changed):
        list(read_shard(flipped))
    assert len(list(read_shard(flipped, verify=False))) == len(index_tar(flipped))  # verify=False: no checksum


def test_a_malformed_or_misplaced_sidecar_is_an_error_naming_it(shard_dir, tmp_path):
    first, second, third, *_ = copy_shards(shard_dir, tmp_path)
    index_path(first).write_text("{not json")
    with pytest.raises(ShardIndexError, match=re.escape(f"{index_path(first)}: not a valid index")):
        index_tar(first)
    shutil.copy(index_path(third), index_path(second))  # another shard's index
    misplaced = re.escape(f"{index_path(second)}: format 1 for tar '{Path(third).name}'")
    with pytest.raises(ShardIndexError, match=misplaced):
        list(iter_samples(second))


def test_an_index_that_points_beside_a_member_fails_before_its_sample(shard_dir, tmp_path):
    url, *_ = copy_shards(shard_dir, tmp_path)
    side = json.loads(index_path(url).read_text())
    key, members = side["samples"][2]
    members[0][2] -= 1  # a size one byte short: still in order and in bounds, but not the tar's
    index_path(url).write_text(json.dumps(side))
    reader = read_shard(url)
    assert [k for k, _ in (next(reader), next(reader))] == [k for k, _ in side["samples"][:2]]
    with pytest.raises(ShardIndexError, match=re.escape(f"{index_path(url)}: member {key}.{members[0][0]} ")):
        next(reader)
    members[0][1] = side["samples"][1][1][-1][1]  # now where the member before it is
    index_path(url).write_text(json.dumps(side))
    with pytest.raises(ShardIndexError, match="overlaps the one before it"):
        index_tar(url)


def test_an_unindexed_broken_tar_is_still_a_read_error_naming_it(unindexed_dir, tmp_path):
    path = tmp_path / "broken.tar"
    path.write_bytes(Path(shard_urls(unindexed_dir, "train")[0]).read_bytes()[:700])  # a cut-off member
    with pytest.raises(ShardReadError, match=re.escape(f"{path}: not a readable shard")):
        list(read_shard(path))


def test_rewriting_a_tar_rewrites_its_sidecar_and_a_failed_write_keeps_both(tmp_path):
    path = tmp_path / "t.tar"
    write_tar(path, [{"__key__": "a", "jpg": b"1", "json": b"{}"}])
    before = (path.read_bytes(), index_path(path).read_bytes())

    def failing():
        yield {"__key__": "b", "jpg": b"22"}
        raise RuntimeError("encoder died")
    with pytest.raises(RuntimeError):
        write_tar(path, failing())
    assert (path.read_bytes(), index_path(path).read_bytes()) == before
    write_tar(path, [{"__key__": "b", "jpg": b"22"}, {"__key__": "c", "jpg": b"333"}])
    assert [(k, m) for k, m in read_shard(path)] == [("b", {"jpg": b"22"}), ("c", {"jpg": b"333"})]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tar", "t.tar" + shards.INDEX_SUFFIX]


def test_benchmark_refuses_cuda_decode_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/shards.py", "--decode", "cuda", "--out", "-"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--decode cuda" in done.stderr and "CUDA" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
