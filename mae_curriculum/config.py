"""Typed configuration: YAML -> dataclasses, validated at load time.

A config file is a YAML mapping whose sections mirror the dataclasses below. Command-line overrides
``section.key=value`` (values parsed as YAML) are applied after the file. Every problem (missing file,
unknown key, wrong type, out-of-range value) raises :class:`ConfigError` with a one-line message that names
the key; the scripts turn it into ``error: ...`` on stderr and exit status 2.

Every enum-like value is a ``typing.Literal`` checked here, by the generic loader, and nowhere else in the
config (the curriculum's names come from :mod:`mae_curriculum.curriculum.schedule`). Values that would pass a
type check and then fail in the run are bounded (the ``MAX_*`` constants and the ``validate_*`` functions),
e.g. ``train.batch_size`` in [1, 65536], ``data.shuffle_buffer`` in [1, 100000] (1 = no shuffling within a
worker's stream), ``log.every_steps`` >= 1, ``data.num_workers`` <= max(32, 4 x usable CPUs) and <= 256,
``model.img_size`` <= 4096 with at most 16384 patches.

The sections shared with fine-tuning (:mod:`mae_curriculum.config_finetune`) are the base classes
``DataConfig``, ``CurriculumConfig``, ``LogConfig``; pre-training's ``Pretrain*`` subclasses add the keys only
pre-training reads (``data.synthetic_*``, ``log.vis_*``) and ``curriculum.grow_micro_batch`` (off by default there;
fine-tuning has its own, on by default).

``output_dir`` (see :func:`check_output_dir_rule`) may be any folder of the user's except the filesystem root,
the home or current folder itself, a shared top-level folder itself (``/home``, ``/tmp``, ``/var``, ``/mnt``,
...), or anything inside the operating system's folders (``/bin``, ``/boot``, ``/dev``, ``/etc``, ``/lib*``,
``/proc``, ``/run``, ``/sbin``, ``/sys``, ``/usr``), judged after resolving ``..`` and symbolic links.

Hostile files: a config file is at most 1 MiB of UTF-8; YAML aliases may not expand the document beyond
100,000 values ("billion laughs") or refer to themselves, nor may it nest deeper than the parser allows; an
error message is one line of at most 1,000 characters, values in it are cut to ~200.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from mae_curriculum.curriculum.schedule import ACCOUNTING_MODES, SCHEDULE_NAMES
from mae_curriculum.data.remote import check_location, is_remote

MAX_MESSAGE_CHARS = 1000  # a ConfigError message never exceeds this (one line)
MAX_CONFIG_BYTES = 1 << 20  # a config file larger than 1 MiB is refused unread
MAX_YAML_VALUES = 100_000  # values in a YAML document once its aliases are expanded


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the offending key.

    The message is made one line (newlines escaped) of at most ``MAX_MESSAGE_CHARS`` characters.
    """

    def __init__(self, msg: object = "") -> None:
        text = str(msg).replace("\r", "\\r").replace("\n", "\\n")
        if len(text) > MAX_MESSAGE_CHARS:
            cut = len(text) - (MAX_MESSAGE_CHARS - 40)
            text = f"{text[: MAX_MESSAGE_CHARS - 40]}... ({cut} more characters)"
        super().__init__(text)


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 200, 200
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 10


def _show(value: Any) -> str:
    """A short repr of a user's value for an error message (nested or long values are cut)."""
    try:
        text = _repr.repr(value)
    except Exception:  # e.g. an int too long to print
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 220 else text[:200] + "..."


# the enum-like values: one Literal each, checked by the loader (_coerce)
ScheduleName = Literal[SCHEDULE_NAMES]  # type: ignore[valid-type]  # the names build_schedule knows
AccountingMode = Literal[ACCOUNTING_MODES]  # type: ignore[valid-type]  # "epochs" | "compute"
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DecodeDevice = Literal["cpu", "gpu"]
CropPlace = Literal["workers", "device"]
LowpassOperator = Literal["fourier", "lanczos"]
ZeroStage = Literal[0, 1, 2, 3]


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
    train_shards: str = "data/demo/train"  # a folder with *.tar + _info.json, or s3:// gs:// http(s):// with one
    val_shards: str = ""  # optional; used for the reconstruction grid / evaluation
    cache_dir: str = ""  # remote shards: a local read-through cache folder (downloaded once, read locally); "" = off
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
    decode: DecodeDevice = "cpu"
    # decompression-bomb bound: an image whose header declares more pixels (w*h) is not decoded (counted corrupt);
    # 0 = auto from the training size: max(40e6, 256 * img_size^2)
    max_image_pixels: int = 0
    max_member_bytes: int = 32 * 2**20  # a shard member larger than this is not read (its sample counts as corrupt)
    # pre-training with data.decode cpu: the workers crop each step straight to a size S between the curriculum's B
    # and the final size (S = min(final, 2B rounded up to the patch); JPEGs decoded at 1/2-1/8 scale where the crop
    # allows), the Fourier crop then takes S -> B: less CPU per image at low B, the B x B input within 40 dB PSNR
    # of the exact path (final-size crop -> Fourier crop to B). With decode gpu the device crops to S (full-size
    # nvJPEG decode). False: the exact path. Ignored by fine-tuning.
    stage_sized_decode: bool = False


@dataclass
class PretrainDataConfig(DataConfig):
    """``data`` of pre-training: the shared fields plus the procedural demo data set."""

    synthetic_if_missing: bool = False  # generate the procedural demo set when train_shards is missing
    synthetic_train_size: int = 3000
    synthetic_val_size: int = 500
    synthetic_image_size: int = 64
    # where the crop + resize happens with data.decode cpu: "workers" (the worker path: each row leaves the workers
    # as an S x S crop) or "device": the workers decode and ship each image's canvas (the union of its crop boxes,
    # at the decoded resolution), the training device crops all rows of a batch in one roi_align; the boxes and flips
    # are the worker path's, what the model sees within 40 dB PSNR of it (docs/benchmarks.md). Less CPU per row
    # (most with curriculum.replay: one canvas for r rows), more bytes to the device. No RandAugment (pre-training
    # has none) and curriculum.lowpass fourier.
    crop: CropPlace = "workers"


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
    schedule: ScheduleName = "constant"  # constant | efficienttrain | efficienttrain++ | ...-deit | ...-convnext | linear | custom
    stages: list[dict] = field(default_factory=list)  # for "custom": [{size, fraction, magnitude}]
    accounting: AccountingMode = "compute"  # for "custom": compute | epochs
    max_magnitude: float = 9.0
    # the low-pass operator that takes an image to the stage's B: "fourier" = the exact central BxB of the
    # spectrum on the device (EfficientTrain v1); "lanczos" = EfficientTrain++'s released code: after the crop,
    # flip and RandAugment the loader's workers resize to B with PIL Lanczos (batches arrive at B; data.decode cpu;
    # about half a worker's images/s: docs/benchmarks.md)
    lowpass: LowpassOperator = "fourier"
    # replay (EfficientTrain++'s answer to a decode-bound loader at low B): one replay factor r per stage of the
    # schedule (e.g. [4, 4, 2, 2, 2, 2, 1, 1, 1, 1] for efficienttrain++, the authors' 4/2/1): at a stage with
    # r > 1 each image is decoded once and used for r crops (box, flip, RandAugment) and, in pre-training, r
    # masks, as r rows of the same batch; the batch then holds batch_size / r distinct images, so each epoch draws
    # 1/r of the split at that stage. r must divide train.batch_size; data.decode cpu. [] = off (every r = 1).
    # Counters: ``decoded`` (images decoded) beside ``samples`` (images trained on). docs/benchmarks.md
    replay: list[int] = field(default_factory=list)


@dataclass
class PretrainCurriculumConfig(CurriculumConfig):
    """``curriculum`` of pre-training: the shared fields plus micro-batch growth."""

    grow_micro_batch: bool = False  # at low B, merge loader batches into bigger micro-batches (fewer accumulation steps)


@dataclass
class PruningConfig:
    """Sample pruning as the authors' code runs it (docs/pruning.md)."""

    method: Literal["none", "infobatch", "seta"] = "none"
    # fraction pruned; -1 = the method's default: seta 0.0 (the authors' ImageNet setting; their CIFAR one is
    # 0.1), infobatch 0.5. The keep ratio 1 - ratio is clamped at >= 0.1 (as in both authors' codes).
    ratio: float = -1.0
    k: int = 10  # SeTa: number of loss groups
    alpha: float = 0.6  # SeTa: window = round(k * alpha) groups (the code's rule; the paper writes ceil)
    delta: float = 0.875  # an epoch that ends past this fraction of training is annealed


@dataclass
class TrainConfig:
    epochs: float = 800.0  # budget in epochs at the final size
    batch_size: int = 64  # per-device micro-batch at the final size
    grad_accum: int = 1
    seed: int = 0
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: ZeroStage = 0
    deterministic: bool = False
    max_steps: int = 0  # stop after this many optimizer steps (0 = run the whole budget); for tests/debugging
    compile: bool = False
    nan_skip_limit: int = 5  # consecutive non-finite steps before rolling back to the last checkpoint
    # seconds any collective (rendezvous included) may wait for the other ranks before this rank gives up and exits
    # 75 (requeue): bounds the hang when a node dies. Must exceed the longest time one rank works alone while the
    # others wait (writing a checkpoint, a first torch.compile); torch's own default is 1800 s for gloo
    dist_timeout_s: float = 600.0


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
    progress_bar: bool = True


@dataclass
class PretrainLogConfig(LogConfig):
    """``log`` of pre-training: the shared fields plus the reconstruction grid."""

    vis_every_epochs: int = 1  # 0 = off
    vis_num_images: int = 8


@dataclass
class PretrainConfig:
    output_dir: str = "runs/mae"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curriculum: PretrainCurriculumConfig = field(default_factory=PretrainCurriculumConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: PretrainLogConfig = field(default_factory=PretrainLogConfig)


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
        if not any(type(value) is type(c) and value == c for c in choices):  # true is not 1, 1.0 is not 1
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            shown = _cut(k) if isinstance(k, str) else _show(k)
            raise ConfigError(f"unknown key '{prefix}{shown}' (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses alias bombs: see :func:`_check_expansion`."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases refer to themselves or expand it beyond ``MAX_YAML_VALUES`` values.

    An alias is a second reference to an already composed node, so a 400-byte document of nested aliases
    ("billion laughs") composes instantly but expands to billions of values in anything that walks or copies
    it (error messages, ``dataclasses.asdict``, the saved ``config.yaml``). Sizes are counted with expansion,
    each distinct node once (iterative, so deep documents do not recurse).
    """
    def children(node: yaml.Node) -> list:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for kv in node.value for n in kv]
        return []

    size: dict[int, int] = {}
    open_: set[int] = set()  # nodes being expanded: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children(node))
            if size[id(node)] > MAX_YAML_VALUES:
                line = node.start_mark.line + 1
                raise ConfigError(f"YAML aliases expand the document beyond {MAX_YAML_VALUES} values (line {line}); "
                                  "write the values out or use fewer aliases")
            continue
        if id(node) in size:
            continue
        open_.add(id(node))
        stack.append((node, True))
        for c in children(node):
            if id(c) in open_:
                raise ConfigError(f"a YAML alias refers to a value that contains it (line {c.start_mark.line + 1})")
            if id(c) not in size:
                stack.append((c, False))


def _parse_yaml(text: str) -> Any:
    """YAML -> Python values, safely (no tags beyond plain data, bounded alias expansion, bounded depth)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise ConfigError("YAML nested too deeply") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _cut(text: str, limit: int = 100) -> str:
    """``text`` for a message, cut to ``limit`` characters (keys, overrides)."""
    return text if len(text) <= limit else text[:limit] + "..."


def apply_override(data: dict, cls: type, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data`` of dataclass ``cls``."""
    if "=" not in assignment:
        raise ConfigError(f"override '{_cut(assignment)}' must look like key=value")
    dotted, raw = assignment.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        key = _cut(".".join(parts[: i + 1]))
        fields_ = {f.name: f for f in dataclasses.fields(node_cls)} if dataclasses.is_dataclass(node_cls) else {}
        if part not in fields_:
            valid = ", ".join(sorted(fields_)) if fields_ else "none"
            raise ConfigError(f"unknown key '{key}' (valid: {valid})")
        if i < len(parts) - 1:
            node_cls = get_type_hints(node_cls)[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: is not a section")
    try:
        value = _parse_yaml(raw) if raw.strip() != "" else ""
    except ConfigError as e:
        raise ConfigError(f"{dotted}: {e}") from None
    except (yaml.YAMLError, ValueError):  # not YAML (or an integer too long to convert): keep the text
        value = raw
    node[parts[-1]] = value


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read YAML ``path`` (may be None for defaults), apply overrides, build and validate ``cls``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            with open(p, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"config file {p}: cannot read it: {e.strerror or e}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p}: larger than {MAX_CONFIG_BYTES >> 20} MiB; is it a config?")
        try:
            loaded = _parse_yaml(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except (yaml.YAMLError, ValueError) as e:
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


# bounds on values that type-check but would fail (or exhaust the machine) later in the run
MAX_IMG_SIZE = 4096  # model.img_size, pixels
MAX_TOKENS = 16384  # (img_size / patch_size)^2 of a ViT / MAE: a 128 x 128 patch grid
MAX_WIDTH = 16384  # embed dims
MAX_DEPTH = 256  # blocks
MAX_IN_CHANS = 64
MAX_BATCH = 65536  # train.batch_size (per device), eval.batch_size, train.grad_accum
MAX_EPOCHS = 100_000
MIN_DIST_TIMEOUT_S, MAX_DIST_TIMEOUT_S = 5.0, 86400.0  # train.dist_timeout_s
MAX_SHUFFLE_BUFFER = 100_000  # samples (raw image bytes) held per loader worker
MAX_WORKERS = 256  # data.num_workers, and at most max(32, 4 x the CPUs this process may use)
MAX_SEED = 2**32 - 1  # numpy's global seed range
MAX_VIS_IMAGES = 64
MAX_SYNTHETIC_SAMPLES = 1_000_000
MAX_STAGES = 1000  # curriculum.stages entries
MAX_PATH_CHARS = 4096
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
               "/sys", "/usr")  # output_dir is never at or inside these
SHARED_TOP_DIRS = ("/home", "/tmp", "/var", "/mnt", "/media", "/opt", "/srv", "/root", "/snap", "/scratch")


def _range(section: Any, prefix: str, name: str, lo: float, hi: float) -> None:
    """``lo <= section.name <= hi``, else one line naming ``prefix.name``."""
    v = getattr(section, name)
    _check(lo <= v <= hi, f"{prefix}.{name} must be in [{lo}, {hi}]; got {_show(v)}")


def max_workers() -> int:
    """The largest ``data.num_workers`` accepted here: 4 x the usable CPUs, at least 32, at most 256."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(MAX_WORKERS, max(32, 4 * cpus))


def check_path_text(value: str, key: str) -> None:
    """A path the OS can take: no NUL byte, at most ``MAX_PATH_CHARS`` characters."""
    _check("\x00" not in value, f"{key}: a path may not contain a NUL byte; got {_show(value)}")
    _check(len(value) <= MAX_PATH_CHARS, f"{key}: path longer than {MAX_PATH_CHARS} characters; got {_show(value)}")


def _resolved(get: Any) -> Path | None:
    """``get().resolve()`` or None (no home folder set, the current folder deleted)."""
    try:
        return get().resolve()
    except (OSError, RuntimeError, KeyError):
        return None


def check_output_dir_rule(value: str, key: str = "output_dir") -> None:
    """Refuse output folders a run must not write into (it writes config.yaml, checkpoints/, ... at the top).

    Refused, after resolving ``..`` and symbolic links: the filesystem root; the current folder, the home
    folder, or any folder containing either; a shared top-level folder itself (``SHARED_TOP_DIRS``: /home,
    /tmp, /var, ...); anything at or inside the operating system's folders (``SYSTEM_DIRS``: /etc, /usr, ...).
    Any other folder is fine, existing or not (a new run, or one to resume).
    """
    _check(value != "", f"{key} must be set")
    check_path_text(value, key)

    def refuse(why: str) -> None:
        raise ConfigError(f"{key} {_cut(value, 200)} is not writable for a run: {why}; choose a folder of your own")

    try:
        resolved = Path(value).resolve()
        spelled = Path(os.path.abspath(value))
    except (OSError, RuntimeError) as e:  # e.g. a symbolic link loop
        raise ConfigError(f"{key}: cannot resolve {_show(value)}: {e}") from None
    for path in (spelled, resolved):
        if path == Path(path.anchor):
            refuse("it is the filesystem root")
        for sysdir in map(Path, SYSTEM_DIRS):
            if path == sysdir or sysdir in path.parents:
                refuse(f"it is inside {sysdir}, a system folder")
        if str(path) in SHARED_TOP_DIRS:
            refuse(f"{path} is a shared top-level folder; use a sub-folder")
    mine = [(what, f) for what, f in (("current folder", _resolved(Path.cwd)), ("home folder", _resolved(Path.home)))
            if f is not None]
    for what, f in mine:
        if resolved == f:
            refuse(f"it is the {what} {f}")
    for what, f in mine:
        if resolved in f.parents:
            refuse(f"it contains the {what} {f}")


def check_image_grid(prefix: str, img_size: int, patch_size: int, tokens: bool = True) -> None:
    """``img_size`` a multiple of ``patch_size``, bounded; with ``tokens``, a bounded patch grid (ViT / MAE)."""
    _check(patch_size > 0, f"{prefix}.patch_size must be > 0; got {patch_size}")
    _check(img_size > 0 and img_size % patch_size == 0,
           f"{prefix}.img_size ({img_size}) must be a positive multiple of {prefix}.patch_size ({patch_size})")
    _check(img_size <= MAX_IMG_SIZE, f"{prefix}.img_size must be <= {MAX_IMG_SIZE}; got {img_size}")
    if tokens:
        grid = img_size // patch_size
        _check(grid * grid <= MAX_TOKENS,
               f"{prefix}.img_size / {prefix}.patch_size gives a {grid}x{grid} patch grid ({grid * grid} tokens); "
               f"at most {MAX_TOKENS} tokens")


def check_heads(prefix: str, dim_key: str, dim: int, heads_key: str, heads: int) -> None:
    _check(1 <= dim <= MAX_WIDTH, f"{prefix}.{dim_key} must be in [1, {MAX_WIDTH}]; got {dim}")
    _check(heads >= 1, f"{prefix}.{heads_key} must be >= 1; got {heads}")
    _check(dim % heads == 0, f"{prefix}.{dim_key} ({dim}) must be divisible by {prefix}.{heads_key} ({heads})")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    check_image_grid(prefix, m.img_size, m.patch_size)
    check_heads(prefix, "embed_dim", m.embed_dim, "num_heads", m.num_heads)
    check_heads(prefix, "decoder_embed_dim", m.decoder_embed_dim, "decoder_num_heads", m.decoder_num_heads)
    _check(0.0 <= m.mask_ratio < 1.0, f"{prefix}.mask_ratio must be in [0, 1); got {m.mask_ratio}")
    for k in ("depth", "decoder_depth"):
        _range(m, prefix, k, 1, MAX_DEPTH)
    _range(m, prefix, "in_chans", 1, MAX_IN_CHANS)
    _check(0 < m.mlp_ratio <= 64, f"{prefix}.mlp_ratio must be in (0, 64]; got {m.mlp_ratio}")


def validate_optim(o: OptimConfig) -> None:
    _check(o.blr > 0 or o.lr > 0, f"optim.blr must be > 0; got {o.blr}")
    _check(o.blr >= 0, f"optim.blr must be >= 0; got {o.blr}")
    _check(o.lr >= 0, f"optim.lr must be >= 0; got {o.lr}")
    _check(o.min_lr >= 0, f"optim.min_lr must be >= 0; got {o.min_lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {o.weight_decay}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1); got {_show(o.betas)}")
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0; got {o.warmup_epochs}")
    _check(o.gradient_clipping >= 0, f"optim.gradient_clipping must be >= 0; got {o.gradient_clipping}")


def validate_train(t: TrainConfig) -> None:
    _check(0 < t.epochs <= MAX_EPOCHS, f"train.epochs must be in (0, {MAX_EPOCHS}]; got {t.epochs}")
    _range(t, "train", "batch_size", 1, MAX_BATCH)
    _range(t, "train", "grad_accum", 1, MAX_BATCH)
    _range(t, "train", "seed", 0, MAX_SEED)
    _check(t.max_steps >= 0, f"train.max_steps must be >= 0; got {t.max_steps}")
    _check(t.nan_skip_limit >= 1, f"train.nan_skip_limit must be >= 1; got {t.nan_skip_limit}")
    _range(t, "train", "dist_timeout_s", MIN_DIST_TIMEOUT_S, MAX_DIST_TIMEOUT_S)


def validate_data(d: DataConfig, in_chans: int | None = None) -> None:
    """The ``data`` section; ``in_chans`` (the model's) must match the length of ``data.mean``/``std``."""
    _check(d.train_shards != "", "data.train_shards must be set")
    for k in ("train_shards", "val_shards"):
        v = getattr(d, k)
        check_path_text(v, f"data.{k}")
        why = check_location(v, f"data.{k}")
        _check(why is None, why or "")
    check_path_text(d.cache_dir, "data.cache_dir")
    _check(not is_remote(d.cache_dir), f"data.cache_dir must be a local folder; got {_show(d.cache_dir)}")
    _range(d, "data", "num_workers", 0, max_workers())
    _range(d, "data", "shuffle_buffer", 1, MAX_SHUFFLE_BUFFER)
    _range(d, "data", "max_image_pixels", 0, 2**40)
    _range(d, "data", "max_member_bytes", 1024, 2**32)
    _check(isinstance(d.stage_sized_decode, bool),
           f"data.stage_sized_decode must be true or false; got {_show(d.stage_sized_decode)}")
    _check(0 < d.crop_scale_min <= d.crop_scale_max <= 1,
           f"data.crop_scale_min/max must satisfy 0 < min <= max <= 1; got {d.crop_scale_min}, {d.crop_scale_max}")
    _check(0 <= d.hflip <= 1, f"data.hflip must be in [0, 1]; got {d.hflip}")
    _check(len(d.mean) == len(d.std) and all(s > 0 for s in d.std), "data.mean/std must have equal length, std > 0")
    if in_chans is not None:
        _check(len(d.mean) == in_chans,
               f"data.mean/std have {len(d.mean)} values but model.in_chans is {in_chans}; give one per channel")
    if isinstance(d, PretrainDataConfig):
        _range(d, "data", "synthetic_train_size", 1, MAX_SYNTHETIC_SAMPLES)
        _range(d, "data", "synthetic_val_size", 1, MAX_SYNTHETIC_SAMPLES)
        _range(d, "data", "synthetic_image_size", 16, MAX_IMG_SIZE)


def check_shards_path(d: DataConfig) -> None:
    """Shard folders must exist (unless pre-training generates the demo data set on first use)."""
    synthetic = getattr(d, "synthetic_if_missing", False) and not is_remote(d.train_shards)
    if not synthetic and not is_remote(d.train_shards) and not Path(d.train_shards).is_dir():
        raise ConfigError(f"data.train_shards: folder not found: {d.train_shards}")
    if d.val_shards and not synthetic and not is_remote(d.val_shards) and not Path(d.val_shards).is_dir():
        raise ConfigError(f"data.val_shards: folder not found: {d.val_shards}")


def validate_checkpoint(c: CheckpointConfig) -> None:
    _check(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1; got {c.keep_last}")
    for k in ("every_steps", "every_epochs", "keep_every_epochs"):
        _check(getattr(c, k) >= 0, f"checkpoint.{k} must be >= 0; got {getattr(c, k)}")
    _check(c.every_minutes >= 0, f"checkpoint.every_minutes must be >= 0; got {c.every_minutes}")


def validate_log(lg: LogConfig) -> None:
    _check(lg.every_steps >= 1, f"log.every_steps must be >= 1; got {lg.every_steps}")
    if isinstance(lg, PretrainLogConfig):
        _check(lg.vis_every_epochs >= 0, f"log.vis_every_epochs must be >= 0 (0 = off); got {lg.vis_every_epochs}")
        _range(lg, "log", "vis_num_images", 1, MAX_VIS_IMAGES)


def validate_curriculum(c: CurriculumConfig, final_size: int, patch_size: int) -> None:
    """Builds the schedule (``curriculum.schedule`` / ``accounting`` are Literals, checked at load)."""
    from mae_curriculum.curriculum.schedule import schedule_for

    _check(len(c.stages) <= MAX_STAGES, f"curriculum.stages: at most {MAX_STAGES} stages; got {len(c.stages)}")
    try:
        schedule_for(c, final_size, patch_size)
    except ValueError as e:
        raise ConfigError(f"curriculum: {e}") from None


MAX_REPLAY = 64


def check_replay(c: CurriculumConfig, d: DataConfig, batch_size: int, final_size: int, patch_size: int) -> None:
    """``curriculum.replay``: one factor per stage, each dividing the micro-batch; CPU decode."""
    if not c.replay:
        return
    from mae_curriculum.curriculum.schedule import schedule_for

    n = len(schedule_for(c, final_size, patch_size).stages)
    _check(len(c.replay) == n, f"curriculum.replay has {len(c.replay)} entries but the schedule "
                               f"{c.schedule} has {n} stages: give one replay factor per stage")
    bad = [r for r in c.replay if not 1 <= r <= MAX_REPLAY]
    _check(not bad, f"curriculum.replay factors must be in [1, {MAX_REPLAY}]; got {bad[0] if bad else ''}")
    bad = [r for r in c.replay if batch_size % r]
    _check(not bad, f"curriculum.replay factor {bad[0] if bad else ''} does not divide train.batch_size {batch_size}")
    _check(d.decode == "cpu" or max(c.replay) == 1,
           f"curriculum.replay decodes once for several crops in the CPU workers; it needs data.decode: cpu "
           f"(got {d.decode})")


def check_lowpass(c: CurriculumConfig, d: DataConfig) -> None:
    """Combinations of ``curriculum.lowpass`` with the data path that cannot run."""
    _check(not (c.lowpass == "lanczos" and d.decode != "cpu"),
           "curriculum.lowpass: lanczos resizes in the CPU loader workers (PIL); it needs data.decode: cpu "
           f"(got {d.decode})")


def check_crop_place(c: CurriculumConfig, d: PretrainDataConfig) -> None:
    """``data.crop: device`` needs the CPU decode (the GPU decode path crops on the device anyway) and the Fourier
    low-pass (Lanczos resizes each crop in the workers)."""
    if d.crop != "device":
        return
    _check(d.decode == "cpu", f"data.crop: device is for data.decode: cpu (data.decode: gpu already crops on the "
                              f"device); got data.decode: {d.decode}")
    _check(c.lowpass == "fourier", "data.crop: device needs curriculum.lowpass: fourier (lanczos resizes each crop in "
                                   "the loader workers)")


def validate_pruning(p: PruningConfig) -> None:
    _check(p.method in ("none", "infobatch", "seta"), f"pruning.method must be none, infobatch or seta; got {p.method!r}")
    _check(p.ratio == -1 or 0 <= p.ratio < 1,
           f"pruning.ratio must be in [0, 1), or -1 for the method's default; got {p.ratio}")
    _check(p.k >= 1, f"pruning.k must be >= 1; got {p.k}")
    _check(0 < p.alpha <= 1, f"pruning.alpha must be in (0, 1]; got {p.alpha}")
    _check(0 < p.delta <= 1, f"pruning.delta must be in (0, 1]; got {p.delta}")


def validate_pretrain(cfg: PretrainConfig) -> None:
    check_output_dir_rule(cfg.output_dir)
    validate_model(cfg.model)
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    validate_data(cfg.data, cfg.model.in_chans)
    check_shards_path(cfg.data)
    validate_checkpoint(cfg.checkpoint)
    validate_log(cfg.log)
    validate_pruning(cfg.pruning)
    validate_curriculum(cfg.curriculum, cfg.model.img_size, cfg.model.patch_size)
    check_lowpass(cfg.curriculum, cfg.data)
    check_replay(cfg.curriculum, cfg.data, cfg.train.batch_size, cfg.model.img_size, cfg.model.patch_size)
    check_crop_place(cfg.curriculum, cfg.data)


_VALIDATORS: dict[type, Any] = {PretrainConfig: validate_pretrain}


def register_validator(cls: type, fn: Any) -> None:
    _VALIDATORS[cls] = fn
