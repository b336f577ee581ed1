"""Two ways to run data-parallel training behind one small interface: DDP and DeepSpeed.

A backend owns the wrapped model, the optimizer and the lr scheduler::

    backend = make_backend("ddp", model, info, BackendOptions(...))
    out = backend.forward(images, masks)    # train/eval mode via backend.train()/.eval()
    out = backend.infer(images, masks)      # the bare module, no collective (see infer)
    backend.step(loss)                      # backward, optimizer step, lr step, zero grads
    backend.save(folder) / backend.load(folder)   # collective: every rank calls them
    backend.module                          # the bare nn.Module (for export / embedding)
    backend.export_state_dict()             # fp32 CPU weights of the whole model (all ranks)
    backend.close()

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` when world size > 1 (a bare
  model otherwise), ``torch.optim.Adam``, optional bf16 autocast (``precision``) and
  SyncBatchNorm (converted before wrapping; CUDA only).
* ``deepspeed``: ``deepspeed.initialize`` with the same Adam and scheduler objects and a
  JSON config file (ZeRO stage 0-2 and precision come from that file; batch sizes are
  filled in from P x K and the world size; ``gradient_clipping`` defaults to 0, i.e. off
  as in ddp, where DeepSpeed's own default is 1.0). With ``bf16`` enabled in the file DeepSpeed
  keeps bf16 weights, so inputs are cast to bf16 here (it does not cast inputs itself).
  On CPU it needs ``gloo`` and JIT-compiles a small op on first use, cached in
  ``TORCH_EXTENSIONS_DIR``.

The optimizer is Adam (``lr``, ``weight_decay``) over trainable parameters; the lr
follows ``lr_lambda(step)`` (a multiplier per optimizer step).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.dist.checkpoint import load_plain, torch_save_atomic
from pipeline.dist.env import DistInfo, bf16_supported

BACKENDS = ("ddp", "deepspeed")


@dataclass(frozen=True)
class BackendOptions:
    """What both backends need. ``micro_batch`` is images per rank per step."""
    lr: float
    weight_decay: float
    lr_lambda: Callable[[int], float]
    micro_batch: int
    precision: str = "fp32"  # ddp: 'bf16' autocast or 'fp32'; deepspeed: from its config file
    channels_last: bool = False
    sync_bn: bool = False
    deepspeed_config: str | Path | None = None


def _optimizer(model: nn.Module, opts: BackendOptions) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, opts.lr_lambda)


def _prepare_model(model: nn.Module, info: DistInfo, opts: BackendOptions,
                   weights_channels_last: bool = True) -> nn.Module:
    if opts.sync_bn and info.distributed:
        if info.device.type != "cuda":
            raise ValueError("reid.sync_bn: SyncBatchNorm needs CUDA devices (torch rejects CPU tensors); "
                             "set reid.sync_bn=false on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before any wrapping
    model = model.to(info.device)
    if opts.channels_last and weights_channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, so evaluation sees one model."""
    if info.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, 0)


class DDPBackend:
    name = "ddp"

    def __init__(self, model: nn.Module, info: DistInfo, opts: BackendOptions):
        self.info = info
        self.module = _prepare_model(model, info, opts)
        self.autocast_dtype = None
        if opts.precision == "bf16":
            if bf16_supported(info.device):
                self.autocast_dtype = torch.bfloat16
            else:
                warnings.warn(f"reid.precision=bf16: no native bf16 on {info.device}; training in fp32")
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # Gradients as views into the all-reduce buckets: no copy, and no stride
            # mismatch warnings for 1x1 convolutions.
            self.wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids,
                                                               gradient_as_bucket_view=True)
        else:
            self.wrapped = self.module
        self.optimizer, self.scheduler = _optimizer(self.module, opts)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            return self.wrapped(images, masks)

    @torch.no_grad()
    def infer(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward through the bare module. DDP's own forward may broadcast buffers (a
        collective) at the first call after training, which deadlocks when ranks embed
        different numbers of batches, or none (fewer shards than ranks); ``sync_buffers``
        does that broadcast once, on every rank, before embedding."""
        with self.autocast():
            return self.module(images, masks)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self.wrapped.train()

    def eval(self) -> None:
        self.wrapped.eval()

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics to every rank (DDP only syncs them at a training forward)."""
        _broadcast_buffers(self.module, self.info)

    def save(self, folder: Path) -> None:
        if self.info.is_main:  # ranks hold identical replicas
            torch_save_atomic({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                               "scheduler": self.scheduler.state_dict()}, Path(folder) / "ddp.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(Path(folder) / "ddp.pt", map_location=self.info.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.module.state_dict().items()}

    def close(self) -> None:
        pass


def load_deepspeed_config(path: str | Path, micro_batch: int, world_size: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and fill in the batch sizes; clear errors for what we do not support."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"reid.deepspeed_config: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"reid.deepspeed_config: {path} is not valid JSON: {exc}") from None
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"{path}: remove the {key!r} section: the optimizer and lr schedule "
                             f"come from params.yaml (reid.lr, reid.weight_decay, reid.warmup_epochs)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{path}: zero_optimization.stage {stage} is not supported here (use 0, 1 or 2)")
    if config.get("fp16", {}).get("enabled"):
        raise ValueError(f"{path}: fp16 is not supported (use bf16, or fp32 with neither enabled)")
    # DeepSpeed 0.19 clips gradients at norm 1.0 unless told otherwise; the ddp backend
    # does not clip, and both must train the same model from the same params.
    config.setdefault("gradient_clipping", 0.0)
    expected = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                "train_batch_size": micro_batch * world_size}
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise ValueError(f"{path}: {key} is {config[key]}, but P x K and the world size give {value} "
                             f"(leave it out: it is filled in from params.yaml)")
        config[key] = value
    return config


class DeepSpeedBackend:
    name = "deepspeed"
    TAG = "deepspeed"

    def __init__(self, model: nn.Module, info: DistInfo, opts: BackendOptions):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # `import deepspeed` imports mlflow
        import deepspeed

        if opts.deepspeed_config is None:
            raise ValueError("the deepspeed backend needs reid.deepspeed_config (a JSON file)")
        self.info = info
        self.config = load_deepspeed_config(opts.deepspeed_config, opts.micro_batch, info.world_size)
        self._own_group = False
        if not dist.is_initialized():
            # One plain process: DeepSpeed still wants a process group (else it looks for MPI).
            for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
                os.environ.setdefault(var, value)
            self._own_group = True
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        # DeepSpeed broadcasts and flattens parameters as contiguous byte views, which
        # channels_last weights are not: weights stay contiguous, channels_last inputs
        # still make the convolutions run in that layout.
        model = _prepare_model(model, info, opts, weights_channels_last=False)
        optimizer, scheduler = _optimizer(model, opts)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        self.module = self.engine.module
        self._dtype = torch.bfloat16 if self.config.get("bf16", {}).get("enabled") else torch.float32

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.engine(images.to(self._dtype), masks)

    @torch.no_grad()
    def infer(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward through the bare module (ZeRO 0-2 keep whole weights in it): no engine hooks,
        no collective, so ranks may embed different numbers of batches."""
        return self.module(images.to(self._dtype), masks)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # optimizer step, zero grads, lr scheduler step

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def sync_buffers(self) -> None:
        _broadcast_buffers(self.module, self.info)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=self.TAG, client_state={}, save_latest=False)

    def load(self, folder: Path) -> None:
        # DeepSpeed's own loader (TorchCheckpointEngine.load, deepspeed 0.19.8) calls
        # torch.load(weights_only=False): a crafted file would run code. So each file is first
        # read with weights_only=True, allowing only the plain-data classes DeepSpeed stores
        # (loss scaler, ZeRO stage enum, fragment addresses); anything else is refused.
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            for file in sorted((Path(folder) / self.TAG).glob("*.pt")):
                if file.name.startswith(("mp_rank_", f"zero_pp_rank_{self.info.rank}_")):
                    load_plain(file)
        path, _ = self.engine.load_checkpoint(str(folder), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        # ZeRO 0-2 keep full weights in the module (bf16 copies when bf16 is on).
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.module.state_dict().items()}

    def close(self) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_backend(kind: str, model: nn.Module, info: DistInfo, opts: BackendOptions):
    """The backend named ``kind`` ('ddp' or 'deepspeed') around ``model`` (moved to ``info.device``)."""
    if kind == "ddp":
        return DDPBackend(model, info, opts)
    if kind == "deepspeed":
        return DeepSpeedBackend(model, info, opts)
    raise ValueError(f"reid.backend: got {kind!r}, expected one of {BACKENDS}")
