"""Typed configuration of ``finetune.py``: MAE fine-tuning, linear probing, supervised training (+ curriculum).

Reuses the sections of :mod:`mae_curriculum.config` where they mean the same thing (data, curriculum, train,
checkpoint, log) and adds the fine-tuning ones. The shared sections are the base classes without the
pre-training-only keys (``data.synthetic_*``, ``log.vis_*`` live in the ``Pretrain*`` subclasses), so a
fine-tune config that sets one fails with the usual ``unknown key`` line. ``curriculum.grow_micro_batch`` exists in
both, off by default in pre-training (``PretrainCurriculumConfig``) and on here (``FTCurriculumConfig``).
Loaded with ``load_config(FinetuneConfig, path, overrides)``; every problem is a one-line
:class:`~mae_curriculum.config.ConfigError` (exit status 2), and the values get the same bounds as in
pre-training (batch size, workers, shuffle buffer, image size, ``output_dir``, ...).

Modes:

* ``finetune``: a pre-trained encoder (``finetune.pretrained``) in a timm ViT with global average pooling +
  fc_norm (``model.global_pool: avg``), layer-wise lr decay, drop path, mixup/cutmix, label smoothing,
  RandAugment, random erasing, optional EMA (the MAE recipe).
* ``linprobe``: the frozen pre-trained encoder, cls-token features after the final norm, a head
  BatchNorm1d(affine=False, eps 1e-6) + Linear (std 0.01), trained with LARS (MAE's protocol).
* ``supervised``: any timm model (``model.name``) from scratch; with a curriculum schedule the input size
  (low-frequency crop on the device) and the RandAugment magnitude follow the stages.

The RandAugment magnitude is always the curriculum stage's (``curriculum.max_magnitude`` with the default
``constant`` schedule: m9 throughout, ``rand-m9-mstd0.5-inc1``); ``augment.randaug: false`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mae_curriculum.config import (MAX_BATCH, MAX_DEPTH, MAX_IN_CHANS, CheckpointConfig, ConfigError,
                                   CurriculumConfig, DataConfig, LogConfig, OptimConfig, TrainConfig, check_heads,
                                   check_image_grid, check_lowpass, check_output_dir_rule, check_path_text,
                                   check_replay, check_shards_path, register_validator, validate_checkpoint,
                                   validate_curriculum,
                                   validate_data, validate_log, validate_optim, validate_train)

MAX_CLASSES = 1_000_000

Mode = Literal["finetune", "linprobe", "supervised"]
GlobalPool = Literal["avg", "token"]
CropMode = Literal["random", "center"]
OptimizerName = Literal["adamw", "lars", "sgd"]


@dataclass
class FTModelConfig:
    name: str = "vit"  # "vit": timm VisionTransformer from the fields below (MAE layout); else a timm model name
    img_size: int = 224  # final training and evaluation size
    patch_size: int = 16  # ViT patch; for other models the granularity of curriculum sizes (e.g. 32 for ResNet)
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0 = from the train shards' _info.json
    global_pool: GlobalPool = "avg"  # "vit" only: avg + fc_norm (MAE fine-tune) | cls token + norm
    drop_path: float = 0.1
    # > 0: the drop-path rate used is drop_path x train.epochs / drop_path_ref_epochs (EfficientTrain++'s rule,
    # ref 200: e.g. DeiT-S 0.1 at a 200-epoch budget, 0.15 at 300); 0 = drop_path as given
    drop_path_ref_epochs: float = 0.0
    head_init_std: float = 2e-5  # MAE fine-tune; linear probe uses 0.01
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (img_size, strict_img_size, ...)


@dataclass
class PretrainedConfig:
    # export folder or its encoder.safetensors / mae.safetensors, a DeepSpeed checkpoint folder (stepNNNNNNNNN),
    # a run's output_dir or its checkpoints/ (newest complete one), or an official MAE .pth ({'model': ...})
    pretrained: str = ""


@dataclass
class AugmentSection:
    crop: CropMode = "random"  # RandomResizedCrop (data.crop_scale_*) + flip, or centre crop
    randaug: bool = True  # RandAugment at the curriculum stage's magnitude (mstd below, inc1)
    randaug_mstd: float = 0.5
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1  # label smoothing
    reprob: float = 0.25  # random erasing probability (pixel mode, on the device batch)


@dataclass
class FTOptimConfig(OptimConfig):
    name: OptimizerName = "adamw"
    blr: float = 5e-4  # lr = blr * global batch / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75  # layer-wise lr decay for "vit" (1.0 = off); scale = decay^(L+1-layer)
    momentum: float = 0.9  # lars / sgd


@dataclass
class FTDataConfig(DataConfig):
    crop_scale_min: float = 0.08  # RandomResizedCrop's default scale (0.08, 1), as in MAE fine-tuning


@dataclass
class FTTrainConfig(TrainConfig):
    epochs: float = 100.0  # budget in epochs at the final size


@dataclass
class FTCurriculumConfig(CurriculumConfig):
    """``curriculum`` of fine-tuning / supervised training: the shared fields plus micro-batch growth, on by default
    here (EfficientTrain++ raises the per-GPU batch at low B with fewer accumulation steps, global batch kept; it
    takes effect when ``train.grad_accum`` > 1: a stage at B merges the largest divisor of grad_accum not above
    (final/B)^2 loader batches into one micro-batch)."""

    grow_micro_batch: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 0  # per rank; 0 = train.batch_size
    every_epochs: int = 1  # evaluate (and keep the best weights) every N epochs; the last epoch always
    # true: evaluate at the size of the stage the model is at (the validation centre crop low-passed to B, the
    # model as it trains; EfficientTrain++'s code evaluates each stage at its input size); false: always at
    # model.img_size (a ViT interpolates its pos-embed, a Swin runs at the final window for the evaluation)
    at_stage_size: bool = False


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass
class LinprobeConfig:
    cache_features: bool = True  # with augment.crop=center: extract the frozen features once, train the head on them


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    mode: Mode = "finetune"
    model: FTModelConfig = field(default_factory=FTModelConfig)
    finetune: PretrainedConfig = field(default_factory=PretrainedConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    curriculum: FTCurriculumConfig = field(default_factory=FTCurriculumConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def uses_mixup(cfg: FinetuneConfig) -> bool:
    return cfg.mode != "linprobe" and (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0) and cfg.augment.mixup_prob > 0


def effective_drop_path(cfg: FinetuneConfig) -> float:
    """The drop-path rate the model is built with: ``model.drop_path``, scaled by ``train.epochs /
    model.drop_path_ref_epochs`` when that is set (EfficientTrain++)."""
    m = cfg.model
    return m.drop_path * cfg.train.epochs / m.drop_path_ref_epochs if m.drop_path_ref_epochs > 0 else m.drop_path


def validate_finetune(cfg: FinetuneConfig) -> None:
    check_output_dir_rule(cfg.output_dir)
    m, a, o = cfg.model, cfg.augment, cfg.optim
    _check(m.name != "", "model.name must be set ('vit' or a timm model name)")
    check_image_grid("model", m.img_size, m.patch_size, tokens=m.name == "vit")
    _check(1 <= m.in_chans <= MAX_IN_CHANS, f"model.in_chans must be in [1, {MAX_IN_CHANS}]; got {m.in_chans}")
    if m.name == "vit":
        _check(1 <= m.depth <= MAX_DEPTH, f"model.depth must be in [1, {MAX_DEPTH}]; got {m.depth}")
        check_heads("model", "embed_dim", m.embed_dim, "num_heads", m.num_heads)
        _check(0 < m.mlp_ratio <= 64, f"model.mlp_ratio must be in (0, 64]; got {m.mlp_ratio}")
    elif cfg.mode != "supervised":
        raise ConfigError(f"mode {cfg.mode} loads an MAE encoder: model.name must be 'vit' (got {m.name!r})")
    _check(0 <= m.num_classes <= MAX_CLASSES, f"model.num_classes must be in [0, {MAX_CLASSES}]; got {m.num_classes}")
    _check(0 <= m.drop_path < 1, f"model.drop_path must be in [0, 1); got {m.drop_path}")
    _check(m.drop_path_ref_epochs >= 0,
           f"model.drop_path_ref_epochs must be >= 0 (0 = off); got {m.drop_path_ref_epochs}")
    _check(effective_drop_path(cfg) < 1,
           f"model.drop_path x train.epochs / model.drop_path_ref_epochs = {m.drop_path} x {cfg.train.epochs} / "
           f"{m.drop_path_ref_epochs} = {effective_drop_path(cfg):g} must be < 1")
    _check(m.head_init_std > 0, f"model.head_init_std must be > 0; got {m.head_init_std}")
    if cfg.mode == "supervised":
        _check(cfg.finetune.pretrained == "",
               "finetune.pretrained is set but mode is supervised (training from scratch): use mode: finetune")
    else:
        p = cfg.finetune.pretrained
        _check(p != "", f"finetune.pretrained must be set for mode {cfg.mode} (an export folder, checkpoint or .pth)")
        check_path_text(p, "finetune.pretrained")
        _check(Path(p).exists(), f"finetune.pretrained: not found: {p}")
    for k in ("mixup", "cutmix"):
        _check(getattr(a, k) >= 0, f"augment.{k} must be >= 0; got {getattr(a, k)}")
    for k in ("mixup_prob", "mixup_switch_prob", "reprob"):
        _check(0 <= getattr(a, k) <= 1, f"augment.{k} must be in [0, 1]; got {getattr(a, k)}")
    _check(0 <= a.smoothing < 1, f"augment.smoothing must be in [0, 1); got {a.smoothing}")
    _check(a.randaug_mstd >= 0, f"augment.randaug_mstd must be >= 0; got {a.randaug_mstd}")
    if uses_mixup(cfg):
        _check(cfg.train.batch_size % 2 == 0, f"mixup/cutmix need an even train.batch_size; got {cfg.train.batch_size}")
    validate_optim(o)
    _check(0 < o.layer_decay <= 1, f"optim.layer_decay must be in (0, 1]; got {o.layer_decay}")
    _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1); got {o.momentum}")
    validate_train(cfg.train)
    _check(not cfg.train.compile, "train.compile is not supported by finetune.py")
    validate_data(cfg.data, m.in_chans)
    check_shards_path(cfg.data)
    _check(cfg.data.val_shards != "", "data.val_shards must be set (top-1/top-5 are measured on it)")
    validate_checkpoint(cfg.checkpoint)
    validate_log(cfg.log)
    validate_curriculum(cfg.curriculum, m.img_size, m.patch_size)
    check_lowpass(cfg.curriculum, cfg.data)
    check_replay(cfg.curriculum, cfg.data, cfg.train.batch_size, m.img_size, m.patch_size)
    _check(not (cfg.curriculum.replay and cfg.mode == "linprobe" and cfg.linprobe.cache_features
                and a.crop == "center"),
           "curriculum.replay has no effect with linprobe.cache_features (features are computed once): remove it")
    _check(0 <= cfg.eval.batch_size <= MAX_BATCH,
           f"eval.batch_size must be in [0, {MAX_BATCH}] (0 = train.batch_size); got {cfg.eval.batch_size}")
    _check(cfg.eval.every_epochs >= 1, f"eval.every_epochs must be >= 1; got {cfg.eval.every_epochs}")
    _check(0 < cfg.ema.decay < 1, f"ema.decay must be in (0, 1); got {cfg.ema.decay}")
    if cfg.mode == "linprobe":
        _check(not cfg.ema.enabled, "ema.enabled is not supported with mode linprobe")


register_validator(FinetuneConfig, validate_finetune)
