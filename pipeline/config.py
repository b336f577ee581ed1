"""params.yaml -> one frozen, validated config object.

Every consumer (DVC stages, torchrun workers, Ray Tune trials) builds its config
through :func:`load_params`, so a value means the same thing everywhere.

Validation is driven by the dataclass annotations below plus per-field bounds in
``metadata``: unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the dotted key path, the bad value and what is allowed.
Dotted overrides (``"shard.samples_per_shard=64"``) are applied to the raw YAML
before validation, so they are checked exactly like the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.cli import InputError, StageArguments
from pipeline.constants import (
    ATTENTIONS,
    PART_DISTANCES,
    TRIAL_METRICS,
    VARIANT_DEFAULTS,
    VARIANTS,
    VEHICLEID_SUBSETS,
    VERIWILD_SUBSETS,
)


class ConfigError(InputError):
    """A params file or override does not match the schema."""


def _bounded(default: Any, *, ge: float | None = None, le: float | None = None,
             gt: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose numeric value (or each element of a tuple) is range-checked."""
    bounds = {k: v for k, v in dict(ge=ge, le=le, gt=gt, lt=lt).items() if v is not None}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata={"bounds": bounds})
    return field(default=default, metadata={"bounds": bounds})


# --------------------------------------------------------------------------- schema

DatasetName = Literal["synthetic", "veri776", "vehicleid", "veriwild"]


@dataclass(frozen=True)
class DataConfig:
    """Which dataset feeds the pipeline (read by the shard stage).

    ``root`` is the dataset folder in its official layout; relative paths are
    relative to the project root. For ``synthetic`` it must be ``synth.out_dir``.
    ``test_subset`` picks the test list: VehicleID 800/1600/2400 (also 3200, 6000,
    13164), VERI-Wild small/medium/large; ignored by VeRi-776 and synthetic.
    ``val_ids`` training identities (the highest vids) are held out as the validation
    splits ``val_query``/``val_gallery`` (:mod:`pipeline.data.holdout`): in-loop
    validation and the choice of λ use them, never the test split. 0: none.
    """
    source: DatasetName = "synthetic"
    root: str = "data/synthetic"
    test_subset: str | None = None
    val_ids: int = _bounded(0, ge=0)


@dataclass(frozen=True)
class SynthConfig:
    """Procedural vehicle dataset written in the VeRi-776 layout (synth stage).

    Sizes are counts of identities/cameras/images; ``image_size`` is the square
    render size in pixels; ``label_fraction`` is the share of *training* images
    that get a parsing label PNG (every test image gets one, to score the parser).
    ``family_size`` [min, max]: identities come in look-alike families of that many
    members (same body, size, paint and fittings; only the marks differ), each family
    wholly in train or in test; ``train_ids``/``test_ids`` stay exact (see
    ``pipeline/data/synthetic/families.py``). [1, 1] turns families off.
    """
    out_dir: str = "data/synthetic"
    train_ids: int = _bounded(150, ge=2)
    test_ids: int = _bounded(30, ge=2)
    cameras: int = _bounded(8, ge=2, le=999)
    cameras_per_id: tuple[int, int] = _bounded((3, 5), ge=2)
    images_per_camera: tuple[int, int] = _bounded((2, 3), ge=1)
    family_size: tuple[int, int] = _bounded((4, 6), ge=1, le=30)
    image_size: int = _bounded(128, ge=32, le=1024)
    label_fraction: float = _bounded(1.0, ge=0.0, le=1.0)
    jpeg_quality: int = _bounded(92, ge=1, le=100)
    workers: int = _bounded(2, ge=1)


@dataclass(frozen=True)
class ShardConfig:
    """WebDataset sharding of every split (shard stage).

    ``min_shards`` should be at least ``world_size x num_workers`` of the largest
    job that will read the training split, so no reader is left without a shard.
    ``resize`` stores images already resized to ``[height, width]`` (decode cost
    falls with pixel count); ``keep_originals`` then also stores the original JPEG.
    ``strict`` makes an undecodable image fatal instead of skipped and listed;
    ``bad_entries``: ``raise`` (default) stops on a dataset with missing or empty images,
    malformed list lines or missing camera rows, after listing every one of them;
    ``skip`` leaves those entries out and lists them in the manifest's ``skipped``.
    ``workers`` processes encode shards in parallel.
    """
    out_dir: str = "data/shards"
    samples_per_shard: int = _bounded(1000, ge=1)
    min_shards: int = _bounded(4, ge=1)
    resize: tuple[int, int] | None = _bounded(None, ge=8)
    keep_originals: bool = False
    jpeg_quality: int = _bounded(95, ge=1, le=100)
    strict: bool = False
    bad_entries: Literal["raise", "skip"] = "raise"
    workers: int = _bounded(2, ge=1)


@dataclass(frozen=True)
class ParserConfig:
    """Vehicle part parser: smp ``Unet`` trained with balanced cross entropy (train_parser stage).

    ``encoder`` is any segmentation-models-pytorch encoder name (paper: se_resnext50_32x4d);
    ``encoder_weights`` is null (random init) or a path to a local encoder state dict:
    nothing is downloaded. ``image_size`` (px, a multiple of 32) is the square training
    and inference size. ``val_fraction`` of the annotated training images is held out
    for validation, by vehicle identity (paper: 500 of 3,165). ``precision`` bf16
    autocasts training forward passes. Augmentation: ``scale`` [min, max] zoom,
    ``shift`` max translation (fraction of the side), ``jitter`` max relative
    brightness/contrast/saturation change (image only), ``flip`` horizontal flip probability.
    ``prior_correction`` stores ``-log w_c`` (w the balanced-CE weights) in the checkpoint,
    added to the logits before the argmax at inference: balanced CE pushes uncertain
    pixels toward rare parts; this undoes it for the label maps (training is unchanged).
    """
    out_dir: str = "models/parser"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    image_size: int = _bounded(64, ge=32, le=1024)
    epochs: int = _bounded(20, ge=1)
    batch_size: int = _bounded(32, ge=1)
    lr: float = _bounded(4e-3, gt=0.0)
    weight_decay: float = _bounded(1e-4, ge=0.0)
    val_fraction: float = _bounded(0.16, gt=0.0, lt=1.0)
    num_workers: int = _bounded(1, ge=0)
    precision: Literal["fp32", "bf16"] = "bf16"
    scale: tuple[float, float] = _bounded((0.9, 1.1), gt=0.0)
    shift: float = _bounded(0.04, ge=0.0, lt=0.5)
    jitter: float = _bounded(0.1, ge=0.0, lt=1.0)
    flip: float = _bounded(0.5, ge=0.0, le=1.0)
    prior_correction: bool = True


@dataclass(frozen=True)
class MasksConfig:
    """Predicted view masks for every ReID image (masks stage).

    ``mask_size`` stores label maps at ``[height, width]`` px; null keeps each image's
    own resolution. ``source``: ``parser`` (predicted masks, the method) or ``labels`` (each
    image's exact label map, an ablation that isolates the parser's contribution; every
    image needs one).
    """
    out_dir: str = "data/masked"
    source: Literal["parser", "labels"] = "parser"
    batch_size: int = _bounded(32, ge=1)
    mask_size: tuple[int, int] | None = _bounded(None, ge=8)
    num_workers: int = _bounded(1, ge=0)


@dataclass(frozen=True)
class LossConfig:
    """``L = w_id L_id + w_gtri L_tri_g + w_ltri L_tri_l + w_center L_center`` (docs/method.md §4).

    The weights and margins are what the sweep searches. ``normalize_local`` L2-normalises
    the part features in the local triplet loss; ``w_center`` weighs the centre loss,
    whose centres step by SGD at ``center_lr``. null: the variant's value
    (``pipeline.constants.VARIANT_DEFAULTS``; official: normalised, 5e-4).
    """
    w_id: float = _bounded(1.0, ge=0.0)
    w_gtri: float = _bounded(1.0, ge=0.0)
    w_ltri: float = _bounded(1.0, ge=0.0)
    margin_g: float = _bounded(0.3, gt=0.0)
    margin_l: float = _bounded(0.3, gt=0.0)
    label_smoothing: float = _bounded(0.1, ge=0.0, lt=1.0)
    normalize_local: bool | None = None
    w_center: float | None = _bounded(None, ge=0.0)
    center_lr: float = _bounded(0.5, gt=0.0)


@dataclass(frozen=True)
class ReidConfig:
    """PVEN training (train_reid stage).

    Batches are ``P`` identities x ``K`` images per rank; every rank runs exactly
    ``batches_per_epoch`` steps an epoch (null: one pass over the training images,
    ``images // (P K world_size)``). ``image_size`` is [height, width] in px.
    ``variant`` 'paper' follows the paper's equations, 'official' the authors' code
    (docs/method.md §3); it sets the method keys left null: ``mask_pool`` (max |
    nearest), ``local_neck`` (BatchNorm over the part features), ``vis_offset`` (added to
    the visibilities), ``part_distance`` (euclidean | sqrt_euclidean) and the loss's
    ``normalize_local`` / ``w_center``. ``attention`` common_visible (eq. 3) or uniform
    (a_i = 1/4, an ablation). The lr warms up linearly from 0 over ``warmup_epochs``,
    then ``schedule`` cosine (per step, down to 1 % at the end) or multistep (the
    authors' ``WarmupMultiStepLR``, per epoch: x ``gamma`` at each of ``milestones``,
    1-based epochs). ``pretrained``: null, 'imagenet' (torchvision weights, needs
    internet) or a path to a local backbone state dict. ``checkpoint_dir`` holds the
    resumable checkpoints (not a DVC output, so a requeued or restarted run resumes;
    one subfolder per configuration fingerprint, the others kept: pipeline/dist/checkpoint.py).
    ``val_every`` epochs the query/gallery mAP is measured in the loop (0: never).
    ``pk_buffer`` caps the samples the P x K batcher holds per loader worker.
    ``precision``/``channels_last`` apply to the ddp backend; DeepSpeed takes its precision from ``deepspeed_config``.
    """
    out_dir: str = "models/reid"
    checkpoint_dir: str = "checkpoints/reid"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"
    pretrained: str | None = None
    last_stride: int = _bounded(1, ge=1, le=2)
    image_size: tuple[int, int] = _bounded((128, 128), ge=32)
    variant: Literal[VARIANTS] = "paper"
    mask_pool: Literal["max", "nearest"] | None = None
    local_neck: bool | None = None
    vis_offset: float | None = _bounded(None, ge=0.0)
    part_distance: Literal[PART_DISTANCES] | None = None
    attention: Literal[ATTENTIONS] = "common_visible"
    loss: LossConfig = LossConfig()
    P: int = _bounded(8, ge=2)
    K: int = _bounded(4, ge=2)
    epochs: int = _bounded(12, ge=1)
    batches_per_epoch: int | None = _bounded(30, ge=1)
    lr: float = _bounded(3.5e-4, gt=0.0)
    weight_decay: float = _bounded(5e-4, ge=0.0)
    warmup_epochs: int = _bounded(1, ge=0)
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: tuple[int, ...] = _bounded((40, 70), ge=1)
    gamma: float = _bounded(0.1, gt=0.0, le=1.0)
    backend: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "cluster/deepspeed/zero1.json"
    nproc_per_node: int = _bounded(1, ge=1)
    sync_bn: bool = False
    precision: Literal["fp32", "bf16"] = "bf16"
    channels_last: bool = True
    checkpoint_every: int = _bounded(50, ge=1)
    val_every: int = _bounded(2, ge=0)
    num_workers: int = _bounded(1, ge=0)
    erase_prob: float = _bounded(0.5, ge=0.0, le=1.0)
    pad: int = _bounded(10, ge=0)
    shuffle_buffer: int = _bounded(512, ge=1)
    pk_buffer: int = _bounded(2048, ge=4)

    def __post_init__(self) -> None:
        # null method keys take the variant's value, so every consumer (model, loss,
        # hashes, the model file) sees one resolved setting.
        defaults = VARIANT_DEFAULTS[self.variant]
        for name in ("mask_pool", "local_neck", "vis_offset", "part_distance"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        loss = {name: defaults[name] for name in ("normalize_local", "w_center") if getattr(self.loss, name) is None}
        if loss:
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, **loss))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (evaluate stage): ``D = D_g + lam * D_l`` ranked block by block.

    ``lam``: a number, null (the model variant's own: paper 1.0, official 0.5) or ``val``: the
    λ of the best mAP on the held-out validation identities (``data.val_ids``;
    :mod:`pipeline.evaluation.lam_scan`), the variant's own when there are none.
    VeRi-776 and synthetic always drop gallery images with the query's id and camera;
    ``remove_junk`` switches it for VERI-Wild (the paper keeps them, toolkits remove them).
    Re-ranking is k-reciprocal with k1, k2, ``rerank_lambda``. ``grid_queries`` ranked lists
    are drawn (first and worst). ``bootstrap`` resamples of the query identities give the
    95% intervals and paired differences (docs/method.md §9); 0 turns them off.
    """
    lam: float | Literal["val"] | None = _bounded("val", ge=0.0)
    batch_size: int = _bounded(64, ge=1)
    query_block: int = _bounded(1024, ge=1)
    gallery_block: int = _bounded(8192, ge=1)
    remove_junk: bool = True
    rerank: bool = False
    k1: int = _bounded(20, ge=1)
    k2: int = _bounded(6, ge=1)
    rerank_lambda: float = _bounded(0.3, ge=0.0, le=1.0)
    vehicleid_repeats: int = _bounded(10, ge=1)
    grid_queries: int = _bounded(8, ge=0)
    num_workers: int = _bounded(1, ge=0)
    bootstrap: int = _bounded(1000, ge=0)


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export (export stage): graphs, parity against torch eager, MLflow logged models.

    ``parity_images`` held-out query images compare onnxruntime with torch eager (features of
    the PVEN, logits of the parser); the stage fails when the largest relative difference
    (max |onnx - torch| / max |torch| per output) exceeds ``tolerance``.
    """
    out_dir: str = "models/export"
    parity_images: int = _bounded(64, ge=1)
    batch_size: int = _bounded(32, ge=1)
    tolerance: float = _bounded(1e-4, ge=0.0)


@dataclass(frozen=True)
class SearchDim:
    """One dimension of the sweep's search space (a ``tune.space`` entry).

    ``key`` is a numeric ``reid.*`` params key (dotted); ``dist`` ``uniform`` or
    ``loguniform`` draws a float in [``low``, ``high``] (loguniform: uniform in log space,
    ``low`` > 0), ``choice`` one of ``values`` (for integer keys too). Each value the
    dimension can produce must itself be valid for ``key`` (checked at load).
    """
    key: str = ""
    dist: Literal["uniform", "loguniform", "choice"] = "uniform"
    low: float | None = None
    high: float | None = None
    values: tuple[float, ...] | None = None


def _dim(key: str, low: float, high: float) -> SearchDim:
    return SearchDim(key=key, dist="uniform", low=low, high=high)


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over the training params (tune stage, ``pipeline/tune.py``).

    ``num_samples`` trials draw ``space`` (random search seeded by ``seed``, or Optuna's TPE
    with ``search: optuna``); each trains ``reid`` with its draw for ``max_t`` epochs (null:
    ``reid.epochs``; the lr schedule spans them), validating every epoch. ``metric`` (one of
    :data:`~pipeline.constants.TRIAL_METRICS`; default the validation mAP of the PVEN
    distance) with ``mode`` picks the best trial; ASHA (``scheduler: asha``) stops trials
    below the top 1/``reduction_factor`` at the rungs ``grace_period`` x rf^k epochs, ``fifo``
    runs all to the end. A trial is a Ray Train run of ``workers`` processes (null: 1 on
    CPU, one per GPU of a node with ``use_gpu``), ``cpus_per_worker`` CPUs each; ``use_gpu``
    auto: when the cluster has GPUs. ``max_concurrent_trials`` null: as many as the
    cluster's CPUs (GPUs) hold. ``max_failures`` retries of a failed trial (from its last
    checkpoint). ``storage`` (a shared path or URI on a multi-node cluster; relative: to
    the project) holds Ray's results and the trials' checkpoints under ``name`` (null:
    ``sweep-<hash of what the sweep trains>``): a rerun with the same name resumes the
    sweep. ``resource_wait_s`` seconds the stage waits for an autoscaling cluster to hold
    one trial's resources before it fails. Results go to ``out_dir``.
    """
    space: tuple[SearchDim, ...] = (
        _dim("reid.loss.w_id", 0.25, 2.0), _dim("reid.loss.w_gtri", 0.25, 2.0), _dim("reid.loss.w_ltri", 0.0, 2.0),
        _dim("reid.loss.margin_g", 0.1, 0.6), _dim("reid.loss.margin_l", 0.1, 0.6))
    num_samples: int = _bounded(8, ge=1)
    metric: Literal[TRIAL_METRICS] = "val_mAP"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    max_t: int | None = _bounded(None, ge=1)
    grace_period: int = _bounded(2, ge=1)
    reduction_factor: float = _bounded(2.0, gt=1.0)
    search: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int | None = _bounded(None, ge=1)
    workers: int | None = _bounded(None, ge=1)
    cpus_per_worker: float = _bounded(1.0, gt=0.0)
    use_gpu: bool | Literal["auto"] = "auto"
    max_failures: int = _bounded(2, ge=0)
    storage: str = "checkpoints/tune"
    name: str | None = None
    resource_wait_s: float = _bounded(0.0, ge=0.0)
    out_dir: str = "tune"


# reid keys a sweep sets itself (epochs: tune.max_t; val_every: 1, so ASHA sees the metric every
# epoch) or that change no result (where files go, how often to checkpoint, process counts).
TUNE_FIXED_KEYS = ("reid.epochs", "reid.val_every", "reid.checkpoint_every", "reid.nproc_per_node",
                   "reid.num_workers")


# Named bundles of overrides. A preset's keys win over params.yaml; explicit overrides
# (`dvc exp run -S`, Tune trials) win over both.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe (docs/method.md §8): needs a GPU and the two ImageNet weight files
    # (README, "Pretrained weights": nothing is downloaded). Both variants train under it.
    "paper": {
        "parser.encoder": "se_resnext50_32x4d",
        "parser.encoder_weights": "weights/se_resnext50_32x4d-imagenet.pt",
        "parser.image_size": 256,
        "parser.epochs": 40,     # examples/parsing/train_parsing.py: 40 epochs of batch 8
        "parser.batch_size": 8,
        "parser.lr": 0.001,  # the default's 0.004 at batch 32, scaled linearly to batch 8
        "reid.backbone": "resnet50",
        "reid.pretrained": "weights/resnet50-imagenet.pt",
        "reid.image_size": [256, 256],
        "reid.P": 16,
        "reid.K": 4,
        "reid.lr": 0.00035,   # Adam 3.5e-4 (configs/veri776_b64_pven.yml); the default's 1e-3 is for random init
        "reid.epochs": 120,
        "reid.batches_per_epoch": None,   # one pass over the training images per epoch
        "reid.warmup_epochs": 10,
        "reid.schedule": "multistep",
        "reid.milestones": [40, 70],
        "reid.gamma": 0.1,
        "reid.num_workers": 8,
        "reid.val_every": 10,  # in-loop query/gallery check on VeRi-776: ~13k images
        "masks.num_workers": 8,
        "eval.num_workers": 8,
    },
}


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml. ``seed`` is shared by every stage; ``preset`` names an
    entry of :data:`PRESETS` applied on top of the file (null: none)."""
    seed: int = _bounded(0, ge=0)
    preset: str | None = None
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    shard: ShardConfig = ShardConfig()
    parser: ParserConfig = ParserConfig()
    masks: MasksConfig = MasksConfig()
    reid: ReidConfig = ReidConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    tune: TuneConfig = TuneConfig()

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON-able data (for logging and hashing)."""
        return _to_plain(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def select(self, keys: Sequence[str]) -> dict[str, Any]:
        """``{key: plain value}`` for top-level names (``"reid"``) or dotted keys (``"masks.out_dir"``)."""
        data = self.to_dict()
        out = {}
        for key in keys:
            node = data
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"{key}: not a params key")
                node = node[part]
            out[key] = node
        return out

    def digest(self, *keys: str) -> str:
        """Short sha256 of the given keys (all of params when none): the params hash tag."""
        data = self.select(keys) if keys else self.to_dict()
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def only(self, keys: Sequence[str], stage: str = "this stage") -> ParamsView:
        """A read-only view that lets ``stage`` read ``keys`` and nothing else (see :class:`ParamsView`)."""
        return ParamsView(self, keys, stage)


class ParamsView:
    """The part of :class:`Params` a stage declares (its ``PARAMS``, equal to its dvc.yaml ``params``).

    Reading anything else raises :class:`ConfigError` naming the key, so a stage can
    never depend on a value that DVC does not track for it. ``reads`` records what
    was read (``"reid"`` for a whole section, ``"masks.out_dir"`` for one key), which
    lets tests check that the declaration lists nothing unused. :meth:`select`,
    :meth:`digest` and :meth:`section` serve logging and hashing of declared keys.
    """

    def __init__(self, params: Params, keys: Sequence[str], stage: str) -> None:
        params.select(keys)   # every declared key must exist
        self._params, self.keys, self.stage = params, tuple(keys), stage
        self.reads: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.keys:
            self.reads.add(name)
            return getattr(self._params, name)
        fields = tuple(k.partition(".")[2] for k in self.keys if k.partition(".")[0] == name)
        if not fields:
            raise ConfigError(f"{self.stage} reads params '{name}', which it does not declare "
                              f"(declared: {', '.join(self.keys)}); add it to the stage's PARAMS and dvc.yaml")
        return _SectionView(getattr(self._params, name), name, fields, self)

    def section(self, name: str) -> dict[str, Any]:
        if name not in self.keys:
            raise ConfigError(f"{self.stage} reads params section '{name}', which it does not declare as a whole")
        self.reads.add(name)
        return self._params.section(name)

    def select(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        return self._params.select(self.keys if keys is None else keys)

    def digest(self, *keys: str) -> str:
        return self._params.digest(*(keys or self.keys))


class _SectionView:
    """One section of a :class:`ParamsView` of which only some keys are declared."""

    def __init__(self, section: Any, name: str, fields: tuple[str, ...], owner: ParamsView) -> None:
        self._section, self._name, self._fields, self._owner = section, name, fields, owner

    def __getattr__(self, field: str) -> Any:
        if field.startswith("_"):
            raise AttributeError(field)
        key = f"{self._name}.{field}"
        if field not in self._fields:
            raise ConfigError(f"{self._owner.stage} reads params '{key}', which it does not declare "
                              f"(declared: {', '.join(self._owner.keys)}); add it to the stage's PARAMS and dvc.yaml")
        self._owner.reads.add(key)
        return getattr(self._section, field)


# --------------------------------------------------------------------------- loading

def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read ``path`` (YAML), apply ``key.path=value`` overrides, validate, return Params."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return params_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def stage_params(params: Params | ParamsView | None, keys: Sequence[str], stage: str,
                 path: str | Path = "params.yaml") -> ParamsView:
    """What a stage's ``main`` works with: ``params`` (or ``path`` loaded) restricted to ``keys``.

    A view handed in by a caller (a test that inspects ``reads``) is used as it is,
    provided it declares the same keys. With no ``params``, a stage started by
    :func:`pipeline.cli.run_stage` reads its ``--params FILE`` (instead of ``path``) and
    applies its ``KEY.PATH=VALUE`` overrides.
    """
    if isinstance(params, ParamsView):
        if set(params.keys) != set(keys):
            raise ConfigError(f"{stage}: a params view of {sorted(params.keys)} was passed, the stage declares "
                              f"{sorted(keys)}")
        return params
    if params is None:
        params = load_params(StageArguments.params_file or path, StageArguments.overrides)
    return params.only(keys, stage)


def params_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()) -> Params:
    """Validate an in-memory mapping (e.g. params.yaml shipped to a Ray Tune trial).

    Order: ``raw``, then the preset it names (after overrides, so an override may pick
    the preset), then ``overrides`` again so they win over the preset.
    """
    preset = apply_overrides(dict(raw), overrides).get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: got {preset!r}, expected null or one of {', '.join(map(repr, PRESETS))}")
        raw = apply_overrides(dict(raw), PRESETS[preset])
    params = build(Params, apply_overrides(dict(raw), overrides), prefix="")
    _check_cross_fields(params)
    return params


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides applied.

    ``overrides`` is either ``["a.b=1", ...]`` (values parsed as YAML, so ``null``,
    ``[1, 2]`` and ``0.5`` mean what they look like) or ``{"a.b": 1}``.
    Overriding a key that does not exist is caught later by validation.
    """
    out = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    items = overrides.items() if isinstance(overrides, Mapping) else map(_split_override, overrides)
    for dotted, value in items:
        node = out
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parents[:i + 1])} is not a section")
            node = child
        node[leaf] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE")
    return key.strip(), yaml.safe_load(value)


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Recursively turn plain YAML data into the dataclass ``cls``, validating as it goes."""
    where = prefix or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key "
                          f"({hint}allowed in {where}: {', '.join(sorted(fields))})")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, key)
        bounds = fields[name].metadata.get("bounds")
        if bounds and values[name] is not None:
            _check_bounds(key, values[name], bounds)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_describe(a) for a in args)
        raise ConfigError(f"{key}: got {value!r}, expected {allowed}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(map(repr, args))}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list of {_describe(args[0])}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: got {value!r}, expected a list of {len(args)} "
                              f"{'/'.join(_describe(a) for a in args)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. test_subset: 800
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_describe(tp)}")


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    return getattr(tp, "__name__", str(tp))


def _check_bounds(key: str, value: Any, bounds: dict[str, float]) -> None:
    items = value if isinstance(value, tuple) else (value,)
    items = [v for v in items if not isinstance(v, str)]   # a literal option (e.g. eval.lam: val) has no range
    tests = {"ge": (lambda v, b: v >= b, ">="), "le": (lambda v, b: v <= b, "<="),
             "gt": (lambda v, b: v > b, ">"), "lt": (lambda v, b: v < b, "<")}
    for item in items:
        for name, bound in bounds.items():
            ok, sign = tests[name]
            if not ok(item, bound):
                rule = " and ".join(f"{tests[n][1]} {b}" for n, b in bounds.items())
                raise ConfigError(f"{key}: got {value!r}, expected a value {rule}")


def _check_cross_fields(p: Params) -> None:
    """Rules that involve more than one key."""
    for section, name in (("synth", "cameras_per_id"), ("synth", "images_per_camera"), ("synth", "family_size"),
                          ("parser", "scale")):
        lo, hi = getattr(getattr(p, section), name)
        if lo > hi:
            raise ConfigError(f"{section}.{name}: got [{lo}, {hi}], expected [min, max] with min <= max")
    if p.synth.cameras_per_id[1] > p.synth.cameras:
        raise ConfigError(f"synth.cameras_per_id: max {p.synth.cameras_per_id[1]} exceeds "
                          f"synth.cameras={p.synth.cameras}")
    if p.parser.image_size % 32:
        raise ConfigError(f"parser.image_size: got {p.parser.image_size}, expected a multiple of 32 (U-Net depth 5)")
    if p.data.source == "synthetic" and p.data.val_ids > p.synth.train_ids - 2:
        raise ConfigError(f"data.val_ids: got {p.data.val_ids}, but synth.train_ids={p.synth.train_ids} leaves fewer "
                          f"than 2 training identities; expected at most {p.synth.train_ids - 2}")
    if p.data.source == "synthetic" and Path(p.data.root) != Path(p.synth.out_dir):
        raise ConfigError(f"data.root: got {p.data.root!r}; with data.source 'synthetic' it must be "
                          f"synth.out_dir ({p.synth.out_dir!r})")
    subsets = {"vehicleid": set(VEHICLEID_SUBSETS), "veriwild": set(VERIWILD_SUBSETS)}
    allowed = subsets.get(p.data.source)
    if allowed is not None and p.data.test_subset not in allowed:
        raise ConfigError(f"data.test_subset: got {p.data.test_subset!r}, expected one of "
                          f"{', '.join(sorted(allowed))} for data.source {p.data.source!r}")
    _check_tune(p)


def _numeric_leaves(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{dotted key: value}`` of every number (not bool) under ``data``."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(_numeric_leaves(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _check_tune(p: Params) -> None:
    """The sweep's rules: every search dimension names a numeric reid key, once, with a
    non-empty range whose values that key accepts; the ASHA rungs fit in the trial."""
    t = p.tune
    if not t.space:
        raise ConfigError("tune.space: empty, expected at least one dimension (key, dist, low/high or values)")
    reid_keys = _numeric_leaves(p.section("reid"), "reid")
    reid_raw = p.section("reid")
    seen: set[str] = set()
    for i, dim in enumerate(t.space):
        where = f"tune.space[{i}]"
        if dim.key not in reid_keys or dim.key in TUNE_FIXED_KEYS:
            allowed = sorted(set(reid_keys) - set(TUNE_FIXED_KEYS))
            close = difflib.get_close_matches(dim.key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            why = "set by the sweep itself" if dim.key in TUNE_FIXED_KEYS else "unknown key"
            raise ConfigError(f"{where}.key: {dim.key!r}: {why} ({hint}a sweep searches numeric reid keys: "
                              f"{', '.join(allowed)})")
        if dim.key in seen:
            raise ConfigError(f"{where}.key: {dim.key!r} appears twice in tune.space")
        seen.add(dim.key)
        where = f"{where} ({dim.key})"
        if dim.dist == "choice":
            if not dim.values or dim.low is not None or dim.high is not None:
                raise ConfigError(f"{where}: dist choice takes a non-empty list of values and no low/high, got "
                                  f"values={list(dim.values) if dim.values is not None else None}, "
                                  f"low={dim.low}, high={dim.high}")
            candidates = list(dim.values)
        else:
            if dim.low is None or dim.high is None or dim.values is not None:
                raise ConfigError(f"{where}: dist {dim.dist} takes low and high and no values, got low={dim.low}, "
                                  f"high={dim.high}, values={dim.values}")
            if not dim.low < dim.high:
                raise ConfigError(f"{where}: empty range [{dim.low}, {dim.high}], expected low < high")
            if dim.dist == "loguniform" and dim.low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got low={dim.low}")
            if isinstance(reid_keys[dim.key], int):
                raise ConfigError(f"{where}: dist {dim.dist} draws floats, but the key takes an integer; "
                                  f"expected dist choice with a list of values")
            candidates = [dim.low, dim.high]
        for value in candidates:
            if isinstance(reid_keys[dim.key], int) and float(value).is_integer():
                value = int(value)   # choice values load as floats; an integer key takes them whole
            try:
                build(ReidConfig, apply_overrides(reid_raw, {dim.key.partition(".")[2]: value}), "reid")
            except ConfigError as exc:
                raise ConfigError(f"{where}: the value {value!r} is not valid for the key: {exc}") from None
    # Only an explicit max_t is checked: with max_t null a short reid.epochs (a quick run that never
    # sweeps) must stay valid; the sweep then lowers the grace period to the epochs (tune/space.py).
    if t.scheduler == "asha" and t.max_t is not None and t.grace_period > t.max_t:
        raise ConfigError(f"tune.grace_period: got {t.grace_period}, expected at most tune.max_t ({t.max_t})")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj
