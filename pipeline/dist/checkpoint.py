"""Resumable training checkpoints, atomic as a whole, for one process or many.

Layout under ``root``::

    step-00000120/           one checkpoint (the global step count it was taken after)
        engine/              what the backend saves (model, optimizer, lr scheduler;
                             DeepSpeed writes its own files here, from every rank)
        train_state.pt       epoch, batch within the epoch, step, history, fingerprint (rank 0)
        rng-rank0.pt ...     each rank's torch / numpy / python RNG states
    latest.json              {"step", "dir", "fingerprint"}: the last *complete* checkpoint

A checkpoint counts only once ``latest.json`` names it, and that file is replaced
atomically after every rank has finished writing (a barrier in between). A run killed
while saving leaves a folder that no ``latest.json`` names; it is ignored and removed
on the next save, and the previous checkpoint stays the one to resume from.

``fingerprint`` identifies what the run trains (params, data, world size): a
checkpoint with another fingerprint is not resumed (the run starts fresh and the
stale checkpoints are removed), so a DVC rerun with changed params never continues
an old model. The checkpoint folder must be on storage every rank can read (a shared
filesystem across nodes).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic
from pipeline.dist.env import DistInfo, barrier

LATEST = "latest.json"


def torch_save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    Saved through an open file object: torch then names the zip records ``archive/``
    instead of after the (random) temporary file name, so equal content gives equal bytes.
    """
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Save and find the latest complete checkpoint of one training run.

    Every method is collective: all ranks call it in the same order.
    ``backend`` objects passed in need ``save(folder)`` and ``load(folder)`` (see
    :mod:`pipeline.dist.backends`).
    """

    def __init__(self, root: str | Path, info: DistInfo, fingerprint: str):
        self.root = Path(root)
        self.info = info
        self.fingerprint = fingerprint

    def _read_latest(self) -> dict | None:
        path = self.root / LATEST
        if not path.exists():
            return None
        try:
            latest = json.loads(path.read_text())
            return latest if (self.root / latest["dir"] / "train_state.pt").exists() else None
        except (ValueError, KeyError):
            return None

    @property
    def latest_dir(self) -> Path | None:
        """The folder of the latest complete checkpoint of this run (same fingerprint), if any."""
        latest = self._read_latest()
        if latest is None or latest.get("fingerprint") != self.fingerprint:
            return None
        return self.root / latest["dir"]

    def save(self, step: int, backend, train_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` from every rank; returns its folder once it is the latest."""
        folder = self.root / f"step-{step:08d}"
        if self.info.is_main:
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of a run killed while saving
            folder.mkdir(parents=True)
        barrier(self.info)
        backend.save(folder / "engine")
        torch_save_atomic(rng_state(), folder / f"rng-rank{self.info.rank}.pt")
        if self.info.is_main:
            torch_save_atomic({**train_state, "fingerprint": self.fingerprint, "step": step},
                              folder / "train_state.pt")
        barrier(self.info)  # every rank's part is on disk before the checkpoint counts
        if self.info.is_main:
            previous = self.latest_dir
            atomic.write_json(self.root / LATEST, {"step": step, "dir": folder.name,
                                                   "fingerprint": self.fingerprint})
            keep = {folder.name} | ({previous.name} if previous is not None else set())
            for old in self.root.glob("step-*"):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        barrier(self.info)
        return folder

    def load(self, backend) -> dict[str, Any] | None:
        """Restore the latest checkpoint into ``backend`` and this rank's RNGs; returns its train state.

        None when there is nothing to resume. Checkpoints of another fingerprint are
        removed (by rank 0) and reported.
        """
        latest = self._read_latest()
        barrier(self.info)  # every rank has read latest.json before rank 0 may remove it
        if latest is not None and latest.get("fingerprint") != self.fingerprint:
            if self.info.is_main:
                print(f"checkpoint: {self.root / latest['dir']} was made by another configuration "
                      f"(fingerprint {latest.get('fingerprint')} != {self.fingerprint}): starting fresh, removing it")
                (self.root / LATEST).unlink(missing_ok=True)
                for old in self.root.glob("step-*"):
                    shutil.rmtree(old, ignore_errors=True)
            barrier(self.info)
            return None
        if latest is None:
            return None
        folder = self.root / latest["dir"]
        backend.load(folder / "engine")
        # Our own files (numpy RNG states need full unpickling); never load foreign ones here.
        state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=False)
        rng_file = folder / f"rng-rank{self.info.rank}.pt"
        if not rng_file.exists():
            raise FileNotFoundError(f"{rng_file}: missing RNG state of rank {self.info.rank} "
                                    f"(was the checkpoint written with another world size?)")
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        return state
