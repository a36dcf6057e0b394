"""Typed configuration: YAML -> dataclasses, validated at load time.

A config file is a YAML mapping whose sections mirror the dataclasses below. Command-line overrides
``section.key=value`` (values parsed as YAML) are applied after the file. Every problem (missing file,
unknown key, wrong type, out-of-range value) raises :class:`ConfigError` with a one-line message that names
the key; the scripts turn it into ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the offending key."""


# --------------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    img_size: int = 224  # final training resolution (the loader crops at this size)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


@dataclass
class DataConfig:
    train_shards: str = "data/demo/train"  # a folder with *.tar + _info.json
    val_shards: str = ""  # optional; used for the reconstruction grid / evaluation
    synthetic_if_missing: bool = False  # generate the procedural demo set when train_shards is missing
    synthetic_train_size: int = 3000
    synthetic_val_size: int = 500
    synthetic_image_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    pin_memory: bool = True
    # "cpu": workers decode + augment; "gpu": workers send JPEG bytes + crop boxes and the batch is decoded and
    # cropped on the training device (torchvision.io.decode_jpeg on CUDA), for hosts whose CPUs cannot keep up
    decode: Literal["cpu", "gpu"] = "cpu"


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * global_batch / 256
    lr: float = 0.0  # absolute lr; 0 -> derived from blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 40.0
    gradient_clipping: float = 0.0  # 0 = off (the MAE recipe does not clip)


@dataclass
class CurriculumConfig:
    schedule: str = "constant"  # constant | efficienttrain | efficienttrain++ | ...-deit | ...-convnext | linear | custom
    stages: list[dict] = field(default_factory=list)  # for "custom": [{size, fraction, magnitude}]
    accounting: str = "compute"  # for "custom": compute | epochs
    max_magnitude: float = 9.0
    grow_micro_batch: bool = False  # at low B, merge loader batches into bigger micro-batches (fewer accumulation steps)


@dataclass
class PruningConfig:
    method: str = "none"  # none | infobatch | seta
    ratio: float = 0.5
    k: int = 10
    alpha: float = 0.6
    delta: float = 0.875


@dataclass
class TrainConfig:
    epochs: float = 800.0  # budget in epochs at the final size
    batch_size: int = 64  # per-device micro-batch at the final size
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = 0
    deterministic: bool = False
    max_steps: int = 0  # stop after this many optimizer steps (0 = run the whole budget); for tests/debugging
    compile: bool = False
    nan_skip_limit: int = 5  # consecutive non-finite steps before rolling back to the last checkpoint


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_minutes: float = 30.0  # 0 = off
    every_epochs: int = 1  # checkpoint at the end of every N epochs (0 = off)
    keep_last: int = 2
    keep_every_epochs: int = 0  # additionally keep the checkpoint of every N-th epoch (0 = none)


@dataclass
class LogConfig:
    every_steps: int = 10
    vis_every_epochs: int = 1
    vis_num_images: int = 8
    progress_bar: bool = True


@dataclass
class FaultsConfig:
    """Fault injection for tests and drills (all off by default)."""

    nan_at_micro_steps: list[int] = field(default_factory=list)  # replace the loss by NaN at these micro-steps
    kill_at_step: int = 0  # SIGKILL this process right after optimizer step N (0 = off)
    kill_after_save_at_step: int = 0  # SIGKILL right after the checkpoint of step N is complete
    kill_during_save_at_step: int = 0  # SIGKILL while saving step N: DeepSpeed files written, marker not yet
    disk_full_at_step: int = 0  # the save of step N fails with ENOSPC (as on a full disk)


@dataclass
class PretrainConfig:
    output_dir: str = "runs/mae"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


# --------------------------------------------------------------------------------------------------------------
# generic loading
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats). Raise ConfigError."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown key '{prefix}{k}' (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, cls: type, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data`` of dataclass ``cls``."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        fields_ = {f.name: f for f in dataclasses.fields(node_cls)} if dataclasses.is_dataclass(node_cls) else {}
        if part not in fields_:
            valid = ", ".join(sorted(fields_)) if fields_ else "none"
            raise ConfigError(f"unknown key '{key}' (valid: {valid})")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node_cls = get_type_hints(node_cls)[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: is not a section")


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read YAML ``path`` (may be None for defaults), apply overrides, build and validate ``cls``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded
    for o in overrides:
        apply_override(data, cls, o)
    cfg = _build(cls, data)
    validate = getattr(cfg, "validate", None) or _VALIDATORS.get(cls)
    if validate is not None:
        validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# validation of values (ranges and cross-field rules)
# --------------------------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    _check(m.patch_size > 0, f"{prefix}.patch_size must be > 0; got {m.patch_size}")
    _check(m.img_size > 0 and m.img_size % m.patch_size == 0,
           f"{prefix}.img_size ({m.img_size}) must be a positive multiple of {prefix}.patch_size ({m.patch_size})")
    _check(m.embed_dim % m.num_heads == 0,
           f"{prefix}.embed_dim ({m.embed_dim}) must be divisible by {prefix}.num_heads ({m.num_heads})")
    _check(m.decoder_embed_dim % m.decoder_num_heads == 0,
           f"{prefix}.decoder_embed_dim ({m.decoder_embed_dim}) must be divisible by "
           f"{prefix}.decoder_num_heads ({m.decoder_num_heads})")
    _check(0.0 <= m.mask_ratio < 1.0, f"{prefix}.mask_ratio must be in [0, 1); got {m.mask_ratio}")
    for k in ("depth", "decoder_depth", "in_chans"):
        _check(getattr(m, k) > 0, f"{prefix}.{k} must be > 0; got {getattr(m, k)}")


def validate_optim(o: OptimConfig) -> None:
    _check(o.blr > 0 or o.lr > 0, f"optim.blr must be > 0; got {o.blr}")
    _check(o.blr >= 0, f"optim.blr must be >= 0; got {o.blr}")
    _check(o.lr >= 0, f"optim.lr must be >= 0; got {o.lr}")
    _check(o.min_lr >= 0, f"optim.min_lr must be >= 0; got {o.min_lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {o.weight_decay}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1); got {o.betas}")
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0; got {o.warmup_epochs}")
    _check(o.gradient_clipping >= 0, f"optim.gradient_clipping must be >= 0; got {o.gradient_clipping}")


def validate_train(t: TrainConfig) -> None:
    _check(t.epochs > 0, f"train.epochs must be > 0; got {t.epochs}")
    _check(t.batch_size > 0, f"train.batch_size must be > 0; got {t.batch_size}")
    _check(t.grad_accum > 0, f"train.grad_accum must be > 0; got {t.grad_accum}")
    _check(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3; got {t.zero_stage}")
    _check(t.max_steps >= 0, f"train.max_steps must be >= 0; got {t.max_steps}")
    _check(t.nan_skip_limit >= 1, f"train.nan_skip_limit must be >= 1; got {t.nan_skip_limit}")


def validate_data(d: DataConfig) -> None:
    _check(d.train_shards != "", "data.train_shards must be set")
    for k in ("train_shards", "val_shards"):
        v = getattr(d, k)
        _check("pipe:" not in v and "://" not in v,
               f"data.{k}: only local folders are accepted (no 'pipe:' commands or URLs); got {v!r}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0; got {d.num_workers}")
    _check(0 < d.crop_scale_min <= d.crop_scale_max <= 1,
           f"data.crop_scale_min/max must satisfy 0 < min <= max <= 1; got {d.crop_scale_min}, {d.crop_scale_max}")
    _check(0 <= d.hflip <= 1, f"data.hflip must be in [0, 1]; got {d.hflip}")
    _check(len(d.mean) == len(d.std) and all(s > 0 for s in d.std), "data.mean/std must have equal length, std > 0")


def check_shards_path(d: DataConfig) -> None:
    """Shard folders must exist (unless the demo data set is generated on first use)."""
    if not d.synthetic_if_missing and not Path(d.train_shards).is_dir():
        raise ConfigError(f"data.train_shards: folder not found: {d.train_shards}")
    if d.val_shards and not d.synthetic_if_missing and not Path(d.val_shards).is_dir():
        raise ConfigError(f"data.val_shards: folder not found: {d.val_shards}")


def validate_checkpoint(c: CheckpointConfig) -> None:
    _check(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1; got {c.keep_last}")
    for k in ("every_steps", "every_epochs", "keep_every_epochs"):
        _check(getattr(c, k) >= 0, f"checkpoint.{k} must be >= 0; got {getattr(c, k)}")
    _check(c.every_minutes >= 0, f"checkpoint.every_minutes must be >= 0; got {c.every_minutes}")


def validate_curriculum(c: CurriculumConfig, final_size: int, patch_size: int) -> None:
    from mae_curriculum.curriculum.schedule import build_schedule

    try:
        build_schedule(c.schedule, final_size=final_size, patch_size=patch_size, max_magnitude=c.max_magnitude,
                       custom=c.stages or None, **({"accounting": c.accounting} if c.schedule == "custom" else {}))
    except ValueError as e:
        raise ConfigError(f"curriculum: {e}") from None


def validate_pruning(p: PruningConfig) -> None:
    _check(p.method in ("none", "infobatch", "seta"), f"pruning.method must be none, infobatch or seta; got {p.method!r}")
    _check(0 <= p.ratio < 1, f"pruning.ratio must be in [0, 1); got {p.ratio}")
    _check(p.k >= 1, f"pruning.k must be >= 1; got {p.k}")
    _check(0 < p.alpha <= 1, f"pruning.alpha must be in (0, 1]; got {p.alpha}")
    _check(0 < p.delta <= 1, f"pruning.delta must be in (0, 1]; got {p.delta}")


def validate_pretrain(cfg: PretrainConfig) -> None:
    _check(cfg.output_dir != "", "output_dir must be set")
    validate_model(cfg.model)
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    validate_data(cfg.data)
    check_shards_path(cfg.data)
    validate_checkpoint(cfg.checkpoint)
    validate_pruning(cfg.pruning)
    validate_curriculum(cfg.curriculum, cfg.model.img_size, cfg.model.patch_size)


_VALIDATORS: dict[type, Any] = {PretrainConfig: validate_pretrain}


def register_validator(cls: type, fn: Any) -> None:
    _VALIDATORS[cls] = fn
