"""Fine-tuning, linear probing and supervised training (with the curriculum) under DeepSpeed.

One step: uint8 batch -> device -> normalise -> Fourier-crop to the stage's size -> random erasing -> mixup /
cutmix -> model -> per-sample loss (reduction='none', for sample pruning) -> mean -> DeepSpeed backward/step
-> EMA. Progress (images, or relative compute ~ size^2 for a compute-accounted schedule) drives the LR
(warm-up + cosine, per step) and the curriculum stage. Notes:

* RandAugment runs in the CPU workers; its magnitude is set at each epoch start from the stage at that moment,
  while the input size follows the stage at every step, so within an epoch that crosses a stage boundary the
  magnitude lags by up to one epoch (EfficientTrain++ stages span several epochs each).
* A ViT's learnable pos-embed is resized (bilinear) at a stage change together with its AdamW moments
  (EfficientTrain++); evaluation at the final size in between interpolates it on the fly (dynamic_img_size).
  The resize needs plain parameters: ZeRO stage 0, fp32 master weights. bf16 runs use torch.autocast around
  the forward (DeepSpeed itself stays fp32), so parameters, EMA and moments are ordinary fp32 tensors.
* Linear probe with ``augment.crop: center`` and ``linprobe.cache_features``: the frozen encoder's features of
  both splits are extracted once; epochs then train the head on them (seeded permutation split over ranks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from mae_curriculum.config import ConfigError, to_dict
from mae_curriculum.config_finetune import FinetuneConfig, uses_mixup
from mae_curriculum.curriculum.fourier import fourier_crop
from mae_curriculum.curriculum.schedule import build_schedule
from mae_curriculum.data.eval_loader import EvalLoader
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.engine import checkpoint as ckpt
from mae_curriculum.engine import dist as D
from mae_curriculum.engine.ds_config import deepspeed_config, resolve_precision
from mae_curriculum.engine.evaluate import FeatureCache, evaluate
from mae_curriculum.engine.logging import Scalars
from mae_curriculum.engine.lr import lr_at, set_lr
from mae_curriculum.engine.pretrain import (EXIT_DIVERGED, EXIT_PREEMPTED, Budget, StopFlag, TrainingError,
                                            check_output_dir, normalise)
from mae_curriculum.engine.state import Counters
from mae_curriculum.models import vit as V

log = logging.getLogger("mae_curriculum.finetune")


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """(N,) losses: timm's SoftTargetCrossEntropy for soft (mixup) targets, LabelSmoothingCrossEntropy (or
    plain cross-entropy) for class indices, without their final mean."""
    if target.dim() == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)
    return F.cross_entropy(logits, target, reduction="none", label_smoothing=smoothing)


def _torch_optimizer(opt):
    while hasattr(opt, "optimizer"):  # DeepSpeed wrappers
        opt = opt.optimizer
    return opt


class FinetuneRun:
    def __init__(self, cfg: FinetuneConfig, resume: str = "auto"):
        self.cfg, self.resume_arg = cfg, resume
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.counters = Counters()
        self.best = {"top1": -1.0, "epoch": -1}
        self.wall_before = 0.0  # wall time of earlier (resumed) attempts
        self.stop = StopFlag()

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        self.t0 = time.time()
        check_output_dir(self.out)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.dev, self.world, self.rank = D.device(), D.world_size(), D.rank()
        self.precision = resolve_precision(cfg.train.precision)
        if self.precision == "fp16":
            raise ConfigError("train.precision=fp16 is not supported for fine-tuning: use bf16 or fp32")
        self.index, self.val_index = load_index(cfg.data.train_shards), load_index(cfg.data.val_shards)
        self.num_classes = m.num_classes or self.index.num_classes
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes: the train shards' _info.json gives {self.num_classes} classes; "
                              f"set it")
        cur = cfg.curriculum
        self.schedule = build_schedule(cur.schedule, final_size=m.img_size, patch_size=m.patch_size,
                                       max_magnitude=cur.max_magnitude, custom=cur.stages or None,
                                       **({"accounting": cur.accounting} if cur.schedule == "custom" else {}))
        model, report = V.build_for_config(cfg, self.num_classes, sorted(set(self.schedule.sizes()) | {m.img_size}))
        if report is not None:
            log.info("pre-trained encoder: %s", report.summary())
            if D.is_main():
                V.write_report(report, self.out)
        self.resizable = cfg.mode != "linprobe" and V.has_resizable_pos_embed(model)
        if self.resizable and len(set(self.schedule.sizes())) > 1 and cfg.train.zero_stage != 0:
            raise ConfigError("resizing the pos-embed at curriculum stage changes needs train.zero_stage=0")
        model.to(self.dev)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)  # mixup / erasing / drop path differ over ranks
        np.random.seed(cfg.train.seed + 1000 * self.rank)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema.decay, device=self.dev)
        import deepspeed

        ds_cfg = deepspeed_config(cfg.train.batch_size, cfg.train.grad_accum, self.world, "fp32",
                                  cfg.train.zero_stage, cfg.optim.gradient_clipping)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=V.build_optimizer(cfg, model),
                                                                 config=ds_cfg)
        self.amp = torch.bfloat16 if self.precision == "bf16" else None
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        self.base_lr = cfg.optim.lr or cfg.optim.blr * self.global_batch / 256
        self.mean = torch.tensor(cfg.data.mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=self.dev).view(1, -1, 1, 1)
        self._prepare_data()
        flops = (lambda s: float(s * s)) if self.schedule.accounting == "compute" else (lambda s: 1.0)
        self.budget = Budget(self.schedule, m.img_size, flops,
                             cfg.train.epochs * self.full_steps * cfg.train.batch_size * self.world * flops(m.img_size))
        self.cur_size = m.img_size
        self.tb = Scalars(self.out / "tensorboard")
        self._resume()
        if D.is_main():
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.stop.install()

    def _prepare_data(self) -> None:
        cfg, a = self.cfg, self.cfg.augment
        aug = AugmentConfig(size=cfg.model.img_size, scale=(cfg.data.crop_scale_min, cfg.data.crop_scale_max),
                            hflip=cfg.data.hflip, randaug_magnitude=-1.0, randaug_mstd=a.randaug_mstd,
                            train=a.crop == "random")
        eval_batch = cfg.eval.batch_size or cfg.train.batch_size
        self.val_loader = EvalLoader(self.val_index, eval_batch, self.world, self.rank, cfg.model.img_size,
                                     cfg.data.num_workers)
        self.cached = self.mixup = self.erasing = None
        if cfg.mode == "linprobe" and cfg.linprobe.cache_features and a.crop == "center":
            t = time.time()
            train = EvalLoader(self.index, eval_batch, self.world, self.rank, cfg.model.img_size, cfg.data.num_workers)
            with self._autocast():
                self.cached = FeatureCache(self.engine.module.features, train, self.val_loader, self.mean, self.std,
                                           self.dev)
            self.full_steps = self.cached.steps_per_epoch(self.world, cfg.train.batch_size, cfg.train.grad_accum)
            if self.full_steps == 0:
                raise ConfigError("train.batch_size x ranks is larger than the train split")
            log.info("linear probe: features of %d + %d images extracted in %.1f s", len(self.cached.train_ids),
                     int((self.cached.val[1] >= 0).sum()), time.time() - t)
            return
        spec = StreamSpec(self.index, cfg.train.batch_size, self.world, self.rank, cfg.data.num_workers,
                          cfg.train.seed, cfg.data.shuffle_buffer, aug, steps_multiple=cfg.train.grad_accum)
        self.loader = ShardLoader(spec, pin_memory=cfg.data.pin_memory and torch.cuda.is_available())
        self.full_steps = self.loader.steps_in_epoch(None)
        if uses_mixup(cfg):
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, label_smoothing=a.smoothing,
                               num_classes=self.num_classes)
        if a.reprob > 0 and cfg.mode != "linprobe":
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(a.reprob, mode="pixel", max_count=1, device=self.dev)

    def _autocast(self):
        return torch.autocast(self.dev.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    # ---------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        arg, existing = self.resume_arg, ckpt.find_resume(self.ckpt_dir)
        if arg == "none":
            if existing is not None:
                raise TrainingError(f"{self.ckpt_dir} already holds checkpoints: use --resume auto or a new "
                                    f"output_dir", 2)
            return
        path = existing if arg == "auto" else ckpt.find_resume(Path(arg)) or Path(arg)
        if path is None:
            return
        if not (path / ckpt.MARKER).is_file():
            raise TrainingError(f"--resume {arg}: no complete checkpoint there", code=2)
        state = json.loads((path / "run_state.json").read_text())
        self._set_size(state["input_size"])  # the pos-embed table of the saved model: shapes must match to load
        try:
            client = ckpt.load(self.engine, path)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e), code=2) from None
        self.counters = Counters.from_dict(client["counters"])
        self.best, self.wall_before = client["best"], client["wall_time_s"]
        if self.ema is not None and "ema" in client:
            self.ema.module.load_state_dict(client["ema"])
        log.info("resumed from %s at step %d (epoch %d)", path, self.counters.step, self.counters.epoch)

    def save(self, epoch_end: int | None = None) -> None:
        c = self.counters
        state = {"counters": c.to_dict(), "best": self.best, "wall_time_s": self._wall()}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        try:
            path = ckpt.save(self.engine, self.ckpt_dir, c.step, state)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        if D.is_main():
            # input_size: the stage size of the last step run (its pos-embed grid); the progress may already
            # point into the next stage, whose resize happens at the next step
            (path / "run_state.json").write_text(json.dumps({"counters": c.to_dict(), "input_size": self.cur_size,
                                                             "world_size": self.world}))
            if epoch_end is not None:
                ckpt.mark_epoch_end(path, epoch_end)
            k = self.cfg.checkpoint
            ckpt.apply_retention(self.ckpt_dir, k.keep_last, k.keep_every_epochs, {})
        D.barrier()

    def _export(self, name: str, module: torch.nn.Module, metrics: dict) -> None:
        if D.is_main():
            from safetensors.torch import save_file

            (self.out / name).mkdir(exist_ok=True)
            sd = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, str(self.out / name / "model.safetensors"))
            (self.out / name / "metrics.json").write_text(json.dumps(metrics, indent=1))

    def _lr(self) -> float:
        o = self.cfg.optim
        return lr_at(self.counters.progress, self.base_lr, o.min_lr, min(1.0, o.warmup_epochs / self.cfg.train.epochs))

    def _wall(self) -> float:
        return self.wall_before + time.time() - self.t0

    # ---------------------------------------------------------------- steps
    def _set_size(self, size: int) -> None:
        if self.resizable and size != self.cur_size:
            V.resize_pos_embed_(self.engine.module, size, _torch_optimizer(self.optimizer))
            if self.ema is not None:
                V.resize_pos_embed_(self.ema.module, size)
            log.info("curriculum: input size %d, pos-embed resized to a %dx%d grid", size,
                     *self.engine.module.patch_embed.grid_size)
        self.cur_size = size

    def _batches(self, epoch: int, start: int, magnitude: float):
        """(input, labels) for the rest of the epoch: normalised images or cached features."""
        if self.cached is None:
            self.loader.start_epoch(epoch, start, None, magnitude=magnitude)
            for b in self.loader:
                yield normalise(b["image"], self.mean, self.std, self.dev), b["label"].to(self.dev)
            return
        yield from self.cached.batches(epoch, start, self.full_steps, self.cfg.train.batch_size, self.world, self.rank,
                                       self.cfg.train.seed)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
        """One micro-step; returns (per-sample losses, non-finite anywhere, stop requested anywhere)."""
        c, cfg = self.counters, self.cfg
        stage = self.schedule.stage_at(c.progress)
        if self.cached is None:
            self._set_size(stage.size)
            if stage.size != x.shape[-1]:
                x = fourier_crop(x, stage.size)
            if self.erasing is not None:
                x = self.erasing(x)
        target = y
        if self.cached is None and self.mixup is not None:
            x, target = self.mixup(x, y)
        with self._autocast():
            logits = self.engine(x) if self.cached is None else self.engine(x, features=True)
        per = per_sample_loss(logits.float(), target, cfg.augment.smoothing if self.cached is None else 0.0)
        loss = per.mean()
        flags = torch.tensor([float(not torch.isfinite(loss.detach())), float(self.stop.requested)], device=self.dev)
        nonfinite, stop = (bool(v) for v in D.all_reduce_flags(flags).tolist())
        images = x.shape[0] * self.world
        c.micro_step += 1
        c.step_in_epoch += 1
        c.samples += images
        c.progress += self.budget.units(stage.size, images) / self.budget.total_units
        if not nonfinite:
            set_lr(self.optimizer, self._lr())
            self.engine.backward(loss)
            self.engine.step()
        return per.detach(), nonfinite, stop

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        model = self.engine.module
        model.eval()
        with self._autocast():
            if self.cached is not None:
                res = self.cached.evaluate(lambda f: model(f, features=True))
            else:
                res = evaluate(model, self.val_loader, self.mean, self.std, self.dev)
                if self.ema is not None:
                    res["ema_top1"] = evaluate(self.ema.module.eval(), self.val_loader, self.mean, self.std,
                                               self.dev)["top1"]
        model.train()
        return res

    def _after_eval(self, res: dict, epoch: int) -> None:
        self.tb.add({f"eval/{k}": v for k, v in res.items() if k in ("top1", "top5", "loss", "ema_top1")}, epoch)
        log.info("epoch %d: top-1 %.2f%%  top-5 %.2f%%  (%d images)%s", epoch, res["top1"], res["top5"], res["count"],
                 f"  EMA top-1 {res['ema_top1']:.2f}%" if "ema_top1" in res else "")
        if res["top1"] > self.best["top1"]:
            self.best = {"top1": res["top1"], "top5": res["top5"], "epoch": epoch}
            self._export("best", self.engine.module, {**res, "epoch": epoch})

    # ---------------------------------------------------------------- the loop
    def run(self) -> int:
        cfg, c = self.cfg, self.counters
        res, res_step = {}, -1  # the latest evaluation and the step it was made at
        consecutive_bad, window = 0, 0
        loss_sum, loss_n = torch.zeros((), device=self.dev), 0
        status = "finished"
        done = c.progress >= 1.0 - 1e-12 or bool(cfg.train.max_steps and c.step >= cfg.train.max_steps)
        while not done:
            stage = self.schedule.stage_at(c.progress)
            # timm parses "rand-m<int>": stage magnitudes are rounded (integers already with max_magnitude 9)
            magnitude = float(round(stage.magnitude)) if cfg.augment.randaug and cfg.mode != "linprobe" else -1.0
            self.tb.add({"curriculum/randaug_magnitude": max(magnitude, 0.0)}, c.step)
            for x, y in self._batches(c.epoch, c.step_in_epoch, magnitude):
                per, nonfinite, stop = self.train_step(x, y)
                if nonfinite:
                    consecutive_bad += 1
                    c.nonfinite_skips += 1
                    log.warning("non-finite loss at micro-step %d: step skipped", c.micro_step)
                    if consecutive_bad >= cfg.train.nan_skip_limit:
                        raise TrainingError(f"{consecutive_bad} consecutive non-finite losses: stopping (lower "
                                            f"optim.blr or enable optim.gradient_clipping)", EXIT_DIVERGED)
                else:
                    consecutive_bad, window = 0, window + 1
                    loss_sum += per.mean()
                    loss_n += 1
                if window == cfg.train.grad_accum:
                    window = 0
                    c.step += 1
                    if self.ema is not None:
                        self.ema.update(self.engine.module, step=c.step)
                    if c.step % cfg.log.every_steps == 0:
                        self.tb.add({"train/loss": (loss_sum / max(loss_n, 1)).item(), "train/lr": self._lr(),
                                     "curriculum/B": self.cur_size, "curriculum/progress": c.progress}, c.step)
                        loss_sum.zero_()
                        loss_n = 0
                if stop:
                    self.save()
                    status = "preempted"
                    break
                if c.progress >= 1.0 - 1e-12 or (cfg.train.max_steps and c.step >= cfg.train.max_steps):
                    done = True
                    break
            if status == "preempted":
                break
            epoch_complete = c.step_in_epoch >= self.full_steps
            if epoch_complete:
                c.epoch, c.step_in_epoch = c.epoch + 1, 0
            if epoch_complete and (c.epoch % cfg.eval.every_epochs == 0 or done):
                res, res_step = self.evaluate(), c.step
                self._after_eval(res, c.epoch)
            every = cfg.checkpoint.every_epochs
            if epoch_complete and not done and every and c.epoch % every == 0:
                self.save(epoch_end=c.epoch - 1)
        if status == "preempted":
            self._write_status(status)
            self.tb.close()
            return EXIT_PREEMPTED
        if res_step != c.step:  # the budget ended mid-epoch (or max_steps): evaluate the final weights
            res = self.evaluate()
            self._after_eval(res, c.epoch + (c.step_in_epoch > 0))
        self.save()
        self._export("last", self.engine.module, res)
        if self.ema is not None:
            self._export("ema", self.ema.module, {"ema_top1": res.get("ema_top1")})
        if D.is_main():
            final = {"mode": cfg.mode, "top1": res["top1"], "top5": res["top5"], "loss": res["loss"],
                     "best_top1": self.best["top1"], "best_epoch": self.best["epoch"],
                     "epochs": round(c.epoch + c.step_in_epoch / self.full_steps, 3),
                     "steps": c.step, "samples": c.samples, "wall_time_s": round(self._wall(), 2),
                     "val_count": res["count"], "val_id_sum": res["id_sum"], "val_unreadable": res["unreadable"],
                     "world_size": self.world, "global_batch": self.global_batch, "base_lr": self.base_lr,
                     "schedule": self.schedule.name, "nonfinite_skips": c.nonfinite_skips,
                     **({"ema_top1": res["ema_top1"]} if "ema_top1" in res else {})}
            (self.out / "final.json").write_text(json.dumps(final, indent=1))
            log.info("finished: top-1 %.2f%% (best %.2f%% at epoch %d), %.2f epochs, %.0f s", res["top1"],
                     self.best["top1"], self.best["epoch"], final["epochs"], final["wall_time_s"])
        self._write_status(status)
        self.tb.close()
        return 0

    def _write_status(self, status: str) -> None:
        if D.is_main():
            c = self.counters
            tmp = self.out / "status.json.tmp"
            tmp.write_text(json.dumps({"status": status, "step": c.step, "epoch": c.epoch, "world_size": self.world}))
            os.replace(tmp, self.out / "status.json")


def run_finetune(cfg: FinetuneConfig, resume: str = "auto") -> int:
    run = FinetuneRun(cfg, resume)
    run.setup()
    return run.run()
