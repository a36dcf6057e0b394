"""Config values that type-check but used to crash later (issue 13, item 7), enums as Literals and fine-tune
sections without pre-training keys (issue 12): each gives one line naming the key (exit 2 from the scripts)."""

import dataclasses
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from mae_curriculum.config import (MAX_MESSAGE_CHARS, ConfigError, CurriculumConfig, PretrainConfig, load_config,
                                   max_workers)
from mae_curriculum.config_finetune import FinetuneConfig
from mae_curriculum.curriculum.schedule import ACCOUNTING_MODES, SCHEDULE_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def one_line_error(cls, path, overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, path, overrides)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg and len(msg) <= MAX_MESSAGE_CHARS, msg[:300]
    return msg


@pytest.fixture
def ft_base(tmp_path):
    """Overrides that make a fine-tune config valid on this machine (shard folders and weights exist)."""
    for d in ("train", "val", "weights"):
        (tmp_path / d).mkdir()
    return [f"data.train_shards={tmp_path / 'train'}", f"data.val_shards={tmp_path / 'val'}",
            f"finetune.pretrained={tmp_path / 'weights'}", f"output_dir={tmp_path / 'out'}"]


# --------------------------------------------------------------------------------------------- bounded values
BAD_VALUES = [  # (overrides, the message starts with)
    (["train.batch_size=1000000000000"], "train.batch_size must be in [1, 65536]; got 1000000000000"),
    (["train.batch_size=0"], "train.batch_size must be in [1, 65536]; got 0"),
    (["train.grad_accum=1000000"], "train.grad_accum must be in [1, 65536]"),
    (["train.epochs=1e12"], "train.epochs must be in (0, 100000]"),
    (["train.seed=-1"], "train.seed must be in [0, 4294967295]"),
    (["train.seed=4294967296"], "train.seed must be in [0, 4294967295]"),
    (["train.zero_stage=true"], "train.zero_stage: must be one of 0, 1, 2, 3; got True"),
    (["train.zero_stage=4"], "train.zero_stage: must be one of 0, 1, 2, 3; got 4"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer must be in [1, 100000]; got 0"),
    (["data.shuffle_buffer=-5"], "data.shuffle_buffer must be in [1, 100000]; got -5"),
    (["data.shuffle_buffer=10000000"], "data.shuffle_buffer must be in [1, 100000]"),
    (["data.num_workers=-1"], "data.num_workers must be in [0, "),
    (["data.num_workers=100000"], "data.num_workers must be in [0, "),
    (["data.decode=tpu"], "data.decode: must be one of cpu, gpu; got 'tpu'"),
    (["data.synthetic_train_size=0"], "data.synthetic_train_size must be in [1, 1000000]"),
    (["data.synthetic_image_size=100000"], "data.synthetic_image_size must be in [16, 4096]"),
    (["data.train_shards=a\x00b"], "data.train_shards: a path may not contain a NUL byte"),
    (["log.every_steps=0"], "log.every_steps must be >= 1; got 0"),
    (["log.vis_num_images=0"], "log.vis_num_images must be in [1, 64]"),
    (["log.vis_every_epochs=-1"], "log.vis_every_epochs must be >= 0"),
    (["model.img_size=1048576"], "model.img_size must be <= 4096; got 1048576"),
    (["model.img_size=2048"], "model.img_size / model.patch_size gives a 256x256 patch grid (65536 tokens)"),
    (["model.img_size=0"], "model.img_size (0) must be a positive multiple of model.patch_size (8)"),
    (["model.patch_size=0"], "model.patch_size must be > 0; got 0"),
    (["model.num_heads=0"], "model.num_heads must be >= 1; got 0"),  # was a ZeroDivisionError in the validator
    (["model.decoder_num_heads=0"], "model.decoder_num_heads must be >= 1; got 0"),
    (["model.embed_dim=1000000000"], "model.embed_dim must be in [1, 16384]"),
    (["model.depth=100000"], "model.depth must be in [1, 256]"),
    (["model.in_chans=1"], "data.mean/std have 3 values but model.in_chans is 1"),
    (["curriculum.schedule=nope"], "curriculum.schedule: must be one of constant, efficienttrain, "),
    (["curriculum.schedule=custom", "curriculum.accounting=flops"], "curriculum.accounting: must be one of epochs, compute"),
    (["train.precision=fp8"], "train.precision: must be one of auto, fp32, bf16, fp16"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o)[:60] for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(overrides, message):
    msg = one_line_error(PretrainConfig, DEMO, overrides)
    assert msg.startswith(message), msg


def test_workers_bound_follows_the_cpus():
    assert 32 <= max_workers() <= 256
    load_config(PretrainConfig, DEMO, [f"data.num_workers={max_workers()}"])
    msg = one_line_error(PretrainConfig, DEMO, [f"data.num_workers={max_workers() + 1}"])
    assert msg == f"data.num_workers must be in [0, {max_workers()}]; got {max_workers() + 1}"


def test_limits_themselves_are_accepted():
    cfg = load_config(PretrainConfig, DEMO, ["train.batch_size=65536", "data.shuffle_buffer=1", "log.every_steps=1",
                                             "data.num_workers=0", "model.img_size=1024", "train.seed=4294967295",
                                             "log.vis_every_epochs=0", "train.zero_stage=3"])
    assert (cfg.train.batch_size, cfg.data.shuffle_buffer, cfg.model.img_size) == (65536, 1, 1024)


# ------------------------------------------------------------------------------------------------ output_dir
@pytest.mark.parametrize("output_dir, why", [
    ("/", "it is the filesystem root"),
    ("../../../../../../../../../../etc/x", "it is inside /etc, a system folder"),
    ("/etc", "it is inside /etc, a system folder"),
    ("/usr/local/runs", "it is inside /usr, a system folder"),
    ("/proc/mae_out", "it is inside /proc, a system folder"),
    ("/sys/x", "it is inside /sys, a system folder"),
    ("/tmp", "/tmp is a shared top-level folder"),
    ("/home/", "/home is a shared top-level folder"),
])
def test_output_dir_refused(output_dir, why):
    msg = one_line_error(PretrainConfig, DEMO, [f"output_dir={output_dir}"])
    assert msg.startswith(f"output_dir {output_dir} is not writable for a run: {why}"), msg


def test_output_dir_not_the_home_or_current_folder(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "home" / "project"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for value, why in (("", "output_dir must be set"),
                       (".", f"it is the current folder {work}"),
                       ("..", f"it is the home folder {home}"),
                       (str(tmp_path), f"it contains the current folder {work}"),
                       ("runs/../.", f"it is the current folder {work}")):
        assert why in one_line_error(PretrainConfig, DEMO, [f"output_dir={value}"])
    (tmp_path / "link").symlink_to("/etc")  # a link is judged by where it leads
    assert "inside /etc" in one_line_error(PretrainConfig, DEMO, [f"output_dir={tmp_path / 'link' / 'x'}"])
    for ok in ("runs/demo", "../runs", str(home / "runs"), str(tmp_path / "elsewhere"), "/tmp/x", "/var/tmp/x"):
        assert load_config(PretrainConfig, DEMO, [f"output_dir={ok}"]).output_dir == ok


# ----------------------------------------------------------------------------------------------------- YAML
def billion_laughs(levels: int = 9) -> str:
    lines = ["curriculum:", "  schedule: custom", "  stages:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly_and_briefly(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    assert bomb.stat().st_size < 600  # 9^9 = 387 million strings once expanded
    t0 = time.monotonic()
    msg = one_line_error(PretrainConfig, bomb, [])
    assert time.monotonic() - t0 < 5
    assert msg.startswith(f"{bomb}: YAML aliases expand the document beyond 100000 values"), msg
    # the same inside an override
    stages = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"
    msg = one_line_error(PretrainConfig, DEMO, ["curriculum.schedule=custom", f"curriculum.stages={stages}"])
    assert msg.startswith("curriculum.stages: YAML aliases expand the document beyond"), msg


def test_yaml_self_reference_deep_nesting_size_and_encoding(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("curriculum:\n  stages: &s [*s]\n")
    assert "a YAML alias refers to a value that contains it" in one_line_error(PretrainConfig, f, [])
    f.write_text("curriculum:\n  stages: " + "[" * 20000 + "]" * 20000 + "\n")
    assert one_line_error(PretrainConfig, f, []).startswith(f"{f}: ")
    f.write_text("# padding\n" * 120_000)
    assert "larger than 1 MiB" in one_line_error(PretrainConfig, f, [])
    f.write_bytes(b"output_dir: \xff\xfe\n")
    assert "not UTF-8 text" in one_line_error(PretrainConfig, f, [])


def test_modest_aliases_still_work(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(DEMO.read_text().replace("data:", "data:\n  mean: &half [0.5, 0.5, 0.5]\n  std: *half", 1))
    cfg = load_config(PretrainConfig, f, [])
    assert cfg.data.mean == cfg.data.std == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("override, start", [
    ("train.batch_size=" + "x" * 100_000, "train.batch_size: expected an integer, got 'xxx"),
    ("train.batch_size=1" + "0" * 5000, "train.batch_size: expected an integer, got '1000"),  # > Python's 4300 digits
    ("optim.betas=[" + ", ".join(["0.5"] * 50_000) + "]", "optim.betas must be two numbers in [0, 1); got [0.5, "),
    ("model." + "k" * 10_000 + "=1", "unknown key 'model."),
    ("data.train_shards=" + "d/" * 3000, "data.train_shards: path longer than 4096 characters"),
], ids=["long string", "long integer", "long list", "long key", "long path"])
def test_long_values_are_cut_in_messages(override, start):
    msg = one_line_error(PretrainConfig, DEMO, [override])
    assert msg.startswith(start) and len(msg) < 600, msg


# ------------------------------------------------------------------------------------------------ enums
def all_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from all_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


FREE_TEXT = {"output_dir", "data.train_shards", "data.val_shards", "data.cache_dir", "finetune.pretrained",
             "model.name"}  # "vit" or any timm model name


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_every_enum_is_a_literal(cls):
    strings = {k for k, tp in all_fields(cls) if tp is str}
    assert strings <= FREE_TEXT, strings - FREE_TEXT
    hints = typing.get_type_hints(CurriculumConfig)
    assert typing.get_args(hints["schedule"]) == SCHEDULE_NAMES  # one list of names: curriculum/schedule.py
    assert typing.get_args(hints["accounting"]) == ACCOUNTING_MODES


def test_finetune_enums_checked_by_the_loader(ft_base):
    for override, start in (("mode=pretrain", "mode: must be one of finetune, linprobe, supervised"),
                            ("optim.name=adam", "optim.name: must be one of adamw, lars, sgd"),
                            ("augment.crop=middle", "augment.crop: must be one of random, center"),
                            ("model.global_pool=max", "model.global_pool: must be one of avg, token"),
                            ("curriculum.schedule=x", "curriculum.schedule: must be one of constant")):
        assert one_line_error(FinetuneConfig, None, [*ft_base, override]).startswith(start)


# ------------------------------------------------------------------------------- fine-tune sections
PRETRAIN_ONLY = {"data": ["synthetic_if_missing", "synthetic_train_size", "synthetic_val_size", "synthetic_image_size"],
                 "log": ["vis_every_epochs", "vis_num_images"]}


@pytest.mark.parametrize("key", [f"{s}.{k}" for s, ks in PRETRAIN_ONLY.items() for k in ks])
def test_finetune_rejects_pretraining_only_keys(key, ft_base, tmp_path):
    msg = one_line_error(FinetuneConfig, ROOT / "configs" / "finetune_demo.yaml", [*ft_base, f"{key}=1"])
    assert msg.startswith(f"unknown key '{key}' (valid: "), msg
    section, name = key.split(".")
    f = tmp_path / "ft.yaml"  # the same from a file
    f.write_text(f"{section}:\n  {name}: 1\n")
    assert one_line_error(FinetuneConfig, f, ft_base).startswith(f"unknown key '{key}' (valid: ")
    # and pre-training still takes it
    load_config(PretrainConfig, DEMO, [f"{key}={'true' if name in ('synthetic_if_missing', 'grow_micro_batch') else 16}"])


def test_finetune_keeps_shared_keys(ft_base):
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune_demo.yaml",
                      [*ft_base, "checkpoint.every_minutes=5", "data.decode=gpu", "log.every_steps=3",
                       "log.progress_bar=false"])
    assert (cfg.checkpoint.every_minutes, cfg.data.decode, cfg.log.every_steps) == (5.0, "gpu", 3)
    assert not hasattr(cfg.data, "synthetic_if_missing") and not hasattr(cfg.log, "vis_every_epochs")
    assert cfg.curriculum.grow_micro_batch is True  # fine-tuning's own, on by default (pre-training: off)
    assert cfg.data.crop_scale_min == 0.35  # the config's value; FTDataConfig's default is 0.08


@pytest.mark.parametrize("override, start", [
    ("train.batch_size=1000000000000", "train.batch_size must be in [1, 65536]"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer must be in [1, 100000]"),
    ("data.num_workers=100000", "data.num_workers must be in [0, "),
    ("log.every_steps=0", "log.every_steps must be >= 1"),
    ("model.img_size=1048576", "model.img_size must be <= 4096"),
    ("model.num_heads=0", "model.num_heads must be >= 1"),
    ("model.num_classes=1000000000", "model.num_classes must be in [0, 1000000]"),
    ("eval.batch_size=1000000000", "eval.batch_size must be in [0, 65536]"),
    ("output_dir=/", "output_dir / is not writable for a run: it is the filesystem root"),
    ("output_dir=../../../../../../../../../../etc/x", "output_dir ../../../../../../../../../../etc/x is not writable"),
    ("finetune.pretrained=a\x00b", "finetune.pretrained: a path may not contain a NUL byte"),
])
def test_finetune_values_get_the_same_bounds(override, start, ft_base):
    msg = one_line_error(FinetuneConfig, ROOT / "configs" / "finetune_demo.yaml", [*ft_base, override])
    assert msg.startswith(start), msg


def test_finetune_non_vit_models_skip_the_token_bound(ft_base):
    cfg = load_config(FinetuneConfig, None, [*ft_base, "mode=supervised", "finetune.pretrained=", "model.name=resnet50",
                                             "model.img_size=2048", "model.patch_size=8"])
    assert cfg.model.img_size == 2048


# ------------------------------------------------------------------------------------------- end to end
def cli(script, config, *overrides):
    r = subprocess.run([sys.executable, str(ROOT / script), "--config", str(config), *overrides],
                       capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.returncode, r.stderr.strip().splitlines()


@pytest.mark.parametrize("override, line", [
    ("train.batch_size=1000000000000", "error: train.batch_size must be in [1, 65536]; got 1000000000000"),
    ("data.shuffle_buffer=0", "error: data.shuffle_buffer must be in [1, 100000]; got 0"),
    ("log.every_steps=0", "error: log.every_steps must be >= 1; got 0"),
    ("output_dir=/", "error: output_dir / is not writable for a run: it is the filesystem root; choose a folder of your own"),
])
def test_pretrain_cli_one_line_exit_2(override, line):
    code, lines = cli("pretrain.py", DEMO, override)
    assert (code, lines) == (2, [line])


def test_cli_alias_bomb_and_finetune_unknown_key(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    code, lines = cli("pretrain.py", bomb)
    assert code == 2 and len(lines) == 1 and "YAML aliases expand the document" in lines[0]
    code, lines = cli("finetune.py", ROOT / "configs" / "finetune_demo.yaml", "log.vis_every_epochs=1")
    assert (code, lines) == (2, ["error: unknown key 'log.vis_every_epochs' (valid: every_steps, progress_bar)"])


def test_saved_config_yaml_loads_back(tmp_path, ft_base):
    """The run folder's config.yaml (to_dict of the loaded config) is itself a valid config of the same class."""
    import yaml

    from mae_curriculum.config import to_dict

    for cls, path, over in ((PretrainConfig, DEMO, [f"output_dir={tmp_path / 'o'}"]),
                            (FinetuneConfig, ROOT / "configs" / "finetune_demo.yaml", ft_base)):
        cfg = load_config(cls, path, over)
        saved = tmp_path / f"{cls.__name__}.yaml"
        saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        assert load_config(cls, saved) == cfg
