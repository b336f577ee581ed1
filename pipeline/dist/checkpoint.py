"""Resumable training checkpoints, atomic as a whole, kept per configuration, for one process or many.

Layout under ``root`` (``reid.checkpoint_dir``)::

    <fingerprint>/                one folder per configuration (see below); never touched by
                                  a run of another configuration
        config.json               what the fingerprint was computed from (to tell folders apart)
        step-00000120/            one checkpoint (the global step count it was taken after)
            engine/               what the backend saves (model, optimizer, lr scheduler;
                                  DeepSpeed writes its own files here, from every rank)
            train_state.pt        epoch, batch within the epoch, step, history (rank 0)
            rng-rank0.pt ...      each rank's torch / numpy / python RNG states, as tensors
            complete.json         written last: step, fingerprint, size + sha256 of every file
        latest.json               {"step", "dir", "fingerprint"}: the newest complete checkpoint
        damaged-step-00000130-... a checkpoint that failed verification, moved aside (kept)

A checkpoint counts only once its ``complete.json`` exists, written after every rank
has finished writing (a barrier in between). A run killed while saving leaves a folder
without it; it is ignored and removed on the next save (it can be rebuilt: it is the
step the run redoes).

Resuming (:meth:`CheckpointManager.load`) takes the newest complete checkpoint whose files
all match their recorded sizes and sha256; one that does not (truncated, overwritten,
half-copied) is reported with a warning naming the file, moved aside as
``damaged-step-*`` (not deleted) and the previous good one is used. Every file is read
with ``torch.load(weights_only=True)``: a file holding anything but tensors and plain
containers (a pickle crafted to run code) is refused with :class:`CheckpointError`.

``fingerprint`` identifies what the run trains (params, data, world size): a run only
resumes its own configuration's checkpoints, and a run with other params (a typo, an
experiment) in the same folder starts fresh *beside* them. Within a configuration the
newest ``keep`` complete checkpoints are kept (the retention rule; 2, so one damaged
checkpoint still leaves one to fall back to). Other configurations are removed only on
request::

    python -m pipeline.dist.checkpoint list checkpoints/reid
    python -m pipeline.dist.checkpoint prune checkpoints/reid --keep 3f9c2a1b0d4e5f67 [--keep ...]
    python -m pipeline.dist.checkpoint prune checkpoints/reid --older-than-days 14

The checkpoint folder must be on storage every rank can read (a shared filesystem
across nodes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic, cli
from pipeline.dist.env import DistInfo, barrier, broadcast_from_main

LATEST, COMPLETE, CONFIG = "latest.json", "complete.json", "config.json"
KEEP = 2  # complete checkpoints kept per configuration


class CheckpointError(cli.InputError):
    """A checkpoint that must not or cannot be loaded (named in the message)."""


class DamagedCheckpointWarning(UserWarning):
    """The newest checkpoint failed verification; an older one is used."""


def torch_save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    Saved through an open file object: torch then names the zip records ``archive/``
    instead of after the (random) temporary file name, so equal content gives equal bytes.
    """
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            # torch's zip writer turns a failed write (disk full) into a RuntimeError about stream
            # positions; raise the OSError underneath, which atomic.replacing names the file in.
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from exc
            raise
    return Path(path)


def load_plain(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs more than that is a :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError/EOFError for broken zips
        raise CheckpointError(f"{path}: refused to load: not a file of tensors and plain data that "
                              f"torch.load(weights_only=True) reads ({type(exc).__name__}: {str(exc)[:300]})") from None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, list]:
    """{relative path: [bytes, sha256]} of every file in a checkpoint folder but complete.json."""
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, file_sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE}


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def verify(folder: Path, fingerprint: str | None = None) -> str | None:
    """Why ``folder`` is not a usable checkpoint (a sentence naming the file), or None when it is."""
    try:
        record = json.loads((folder / COMPLETE).read_text())
        files = record["files"]
    except FileNotFoundError:
        return f"{folder / COMPLETE} is missing (the save did not finish)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{folder / COMPLETE} is unreadable ({exc})"
    if fingerprint is not None and record.get("fingerprint") != fingerprint:
        return f"{folder / COMPLETE} belongs to configuration {record.get('fingerprint')}, not {fingerprint}"
    for rel, (size, digest) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)"
        if file_sha256(path) != digest:
            return f"{path} does not match the sha256 recorded when it was written (corrupt or replaced)"
    return None


class CheckpointManager:
    """Save and find the latest good checkpoint of one training configuration.

    Every method but :attr:`latest_dir` is collective: all ranks call it in the same order.
    ``backend`` objects passed in need ``save(folder)`` and ``load(folder)`` (see
    :mod:`pipeline.dist.backends`). ``about`` (plain data) is written once to
    ``<fingerprint>/config.json``.
    """

    def __init__(self, root: str | Path, info: DistInfo, fingerprint: str, keep: int = KEEP,
                 about: dict[str, Any] | None = None):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        self.root = Path(root)
        self.dir = self.root / fingerprint
        self.info, self.fingerprint, self.keep, self.about = info, fingerprint, keep, about

    def _complete(self) -> list[Path]:
        """This configuration's folders that have a complete.json, newest step first (not verified)."""
        return sorted((p for p in self.dir.glob("step-*") if (p / COMPLETE).exists()), key=_step_of, reverse=True)

    @property
    def latest_dir(self) -> Path | None:
        """The newest complete checkpoint folder of this configuration, if any (not verified)."""
        found = self._complete()
        return found[0] if found else None

    def check_writable(self, need_bytes: int = 0) -> None:
        """Fail before training when the checkpoint folder cannot take one checkpoint (rank 0 probes)."""
        if self.info.is_main:
            atomic.check_writable(self.dir, need_bytes, "reid.checkpoint_dir")
        barrier(self.info)

    def save(self, step: int, backend, train_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` from every rank; returns its folder once it is complete."""
        folder = self.dir / f"step-{step:08d}"
        if self.info.is_main:
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of a run killed while saving
            folder.mkdir(parents=True)
            if self.about is not None and not (self.dir / CONFIG).exists():
                atomic.write_json(self.dir / CONFIG, {"fingerprint": self.fingerprint, **self.about})
        barrier(self.info)
        backend.save(folder / "engine")
        torch_save_atomic(rng_state(), folder / f"rng-rank{self.info.rank}.pt")
        if self.info.is_main:
            torch_save_atomic({**train_state, "fingerprint": self.fingerprint, "step": step},
                              folder / "train_state.pt")
        barrier(self.info)  # every rank's part is on disk before the checkpoint counts
        if self.info.is_main:
            atomic.write_json(folder / COMPLETE, {"step": step, "fingerprint": self.fingerprint,
                                                  "world_size": self.info.world_size, "files": _files(folder)})
            atomic.write_json(self.dir / LATEST, {"step": step, "dir": folder.name, "fingerprint": self.fingerprint})
            self._apply_retention(folder)
        barrier(self.info)
        return folder

    def _apply_retention(self, newest: Path) -> None:
        """Keep the newest ``keep`` complete checkpoints of this configuration; drop unfinished saves."""
        complete = self._complete()
        keep = {p.name for p in complete[:self.keep]} | {newest.name}
        for old in self.dir.glob("step-*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _choose(self) -> str | None:
        """Rank 0: the newest verified checkpoint's folder name; damaged newer ones are moved aside."""
        for folder in self._complete():
            problem = verify(folder, self.fingerprint)
            if problem is None:
                return folder.name
            aside = folder.with_name(f"damaged-{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}")
            folder.rename(aside)
            older = [p for p in self._complete() if p != folder]
            msg = (f"checkpoint: {problem}; the checkpoint is not used and was moved to {aside} "
                   f"(kept for inspection; delete it when done). "
                   + (f"Trying the previous one, {older[0]}." if older else "No older checkpoint: starting fresh."))
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)
            warnings.warn(msg, DamagedCheckpointWarning, stacklevel=3)
        return None

    def load(self, backend) -> dict[str, Any] | None:
        """Restore the newest good checkpoint into ``backend`` and this rank's RNGs; returns its train state.

        None when this configuration has nothing to resume. Checkpoints of other
        configurations in ``root`` are left alone (see the module docstring).
        """
        name = self._choose() if self.info.is_main else None
        name = broadcast_from_main(name, self.info)
        if name is None:
            if self.info.is_main:
                others = sorted(p.name for p in self.root.glob("*") if (p / LATEST).exists() and p != self.dir)
                if others:
                    print(f"checkpoint: no checkpoint of this configuration ({self.fingerprint}) in {self.root}; "
                          f"starting fresh beside {len(others)} other configuration(s) {', '.join(others)}, "
                          f"which are kept (python -m pipeline.dist.checkpoint list|prune {self.root})", flush=True)
            return None
        folder = self.dir / name
        state = load_plain(folder / "train_state.pt")
        rng_file = folder / f"rng-rank{self.info.rank}.pt"
        if not rng_file.exists():
            raise CheckpointError(f"{rng_file}: missing RNG state of rank {self.info.rank} "
                                  f"(was the checkpoint written with another world size?)")
        rng = load_plain(rng_file)
        backend.load(folder / "engine")
        set_rng_state(rng)
        return state


# --------------------------------------------------------------------------- command line

def configurations(root: str | Path) -> list[dict[str, Any]]:
    """One row per configuration folder under ``root``: fingerprint, newest step, bytes, age in days."""
    rows = []
    for folder in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        steps = sorted((p for p in folder.glob("step-*") if (p / COMPLETE).exists()), key=_step_of)
        if not steps and not (folder / LATEST).exists():
            continue  # not a configuration folder
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
        about = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).exists() else {}
        rows.append({"fingerprint": folder.name, "steps": [_step_of(p) for p in steps], "bytes": size,
                     "age_days": round((time.time() - newest) / 86400, 2), "about": about})
    return rows


def prune(root: str | Path, keep: tuple[str, ...] = (), older_than_days: float | None = None) -> list[str]:
    """Remove configuration folders: all but ``keep``, or (with ``older_than_days``) those not written
    to for that long (``keep`` still protects). Returns the removed fingerprints."""
    if not keep and older_than_days is None:
        raise ValueError("prune needs --keep FINGERPRINT or --older-than-days N: nothing is removed by default")
    rows = configurations(root)
    unknown = set(keep) - {r["fingerprint"] for r in rows}
    if unknown:
        raise ValueError(f"{root}: no configuration {', '.join(sorted(unknown))} to keep "
                         f"(found: {', '.join(r['fingerprint'] for r in rows) or 'none'})")
    removed = []
    for row in rows:
        old_enough = older_than_days is None or row["age_days"] >= older_than_days
        if row["fingerprint"] not in keep and old_enough:
            shutil.rmtree(Path(root) / row["fingerprint"])
            removed.append(row["fingerprint"])
    return removed


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.dist.checkpoint",
                                     description="List or prune the per-configuration checkpoint folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list").add_argument("root")
    p = sub.add_parser("prune")
    p.add_argument("root")
    p.add_argument("--keep", action="append", default=[], metavar="FINGERPRINT")
    p.add_argument("--older-than-days", type=float, default=None)
    args = parser.parse_args(argv)
    if args.command == "list":
        for row in configurations(args.root):
            print(f"{row['fingerprint']}  steps {row['steps']}  {row['bytes'] / 1e6:.1f} MB  "
                  f"{row['age_days']} days  {json.dumps(row['about'], sort_keys=True)[:200]}")
        return
    try:
        removed = prune(args.root, tuple(args.keep), args.older_than_days)
    except ValueError as exc:
        raise cli.InputError(str(exc)) from None
    print(f"removed {len(removed)} configuration(s): {', '.join(removed) or 'none'}")


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
