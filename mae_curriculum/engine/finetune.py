"""Fine-tuning, linear probing and supervised training (with the curriculum) under DeepSpeed.

The step (:meth:`FinetuneRun.train_step`): uint8 batch -> device -> normalise -> low-frequency crop to the stage's
size -> random erasing -> mixup / cutmix -> model -> per-sample loss -> mean -> DeepSpeed backward/step; EMA after
each optimizer step. Progress (images, or relative compute ~ size^2 for a compute-accounted schedule) drives the
LR (warm-up + cosine, per step) and the curriculum stage. The run lifecycle (resume, checkpoints, stop signal,
non-finite policy, status, exit codes) is the pre-training engine's (:mod:`engine.lifecycle`). Notes:

* RandAugment runs in the CPU workers at the magnitude of each loader step's stage: the stage of every step is a
  pure function of the progress at the epoch start (:func:`~mae_curriculum.engine.progress.step_stages`), so
  the workers get a per-step plan and a stage that begins mid-epoch gets its magnitude at its first step.
* Micro-batch growth (``curriculum.grow_micro_batch``, on by default here; the mechanism of
  :mod:`engine.accumulation`, shared with pre-training): at low B, loader batches are merged into bigger
  micro-batches with fewer accumulation steps, the global batch unchanged (needs ``train.grad_accum`` > 1).
* A ViT's learnable pos-embed is resized (bilinear) at a stage change together with its AdamW moments
  (EfficientTrain++); evaluation at the final size in between interpolates it on the fly (dynamic_img_size).
  A Swin's attention window follows the stage (B/32 for the 224 / window-7 models) with its relative-position-
  bias tables and their AdamW moments resampled (bilinear, EfficientTrain++); evaluation at the final size in
  between runs the model at the final window and puts the tables back exactly afterwards.
  The resize needs plain parameters: ZeRO stage 0, fp32 master weights. bf16 runs use torch.autocast around
  the forward (DeepSpeed itself stays fp32), so parameters, EMA and moments are ordinary fp32 tensors.
* Linear probe with ``augment.crop: center`` and ``linprobe.cache_features``: the frozen encoder's features of
  both splits are extracted once; epochs then train the head on them (seeded permutation split over ranks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mae_curriculum.config import ConfigError
from mae_curriculum.config_finetune import FinetuneConfig, effective_drop_path, uses_mixup
from mae_curriculum.curriculum.flops import (TRAINING_FLOPS_PER_FORWARD, measured_forward_flops,
                                             vit_classifier_flops_per_image)
from mae_curriculum.curriculum.schedule import Stage, schedule_for
from mae_curriculum.data.eval_loader import EvalLoader
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.engine import classifier as C
from mae_curriculum.engine import dist as D
from mae_curriculum.engine import hooks
from mae_curriculum.engine.accumulation import Accumulation
from mae_curriculum.engine.ds_config import deepspeed_config, resolve_precision
from mae_curriculum.engine.evaluate import FeatureCache, evaluate
from mae_curriculum.engine.inputs import at_size, lowpass, normalise
from mae_curriculum.engine.lifecycle import Agreement, RunLifecycle
from mae_curriculum.engine.logging import Scalars
from mae_curriculum.engine.lr import lr_at, set_lr
from mae_curriculum.engine.metrics import TrainMetrics
from mae_curriculum.engine.optim import build_optimizer
from mae_curriculum.engine.pretrained import write_report
from mae_curriculum.engine.progress import Budget, step_replays, step_sizes, step_stages
from mae_curriculum.engine.state import Counters

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


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss of the micro-batch (not synchronised)
    agreed: Agreement


class FinetuneRun(RunLifecycle):
    def __init__(self, cfg: FinetuneConfig, resume: str = "auto"):
        super().__init__(cfg, resume)
        self.best = {"top1": -1.0, "epoch": -1}
        self.wall_before = 0.0  # wall time of earlier (resumed) attempts
        self.last_eval: tuple[dict, int] = ({}, -1)  # the latest evaluation and the step it was made at
        self.decoded_local = 0  # rows of this rank decoded from their own sample since the last sync

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        self.t0 = time.time()
        self.begin()
        self.precision = resolve_precision(cfg.train.precision)
        if self.precision == "fp16":
            raise ConfigError("train.precision=fp16 is not supported for fine-tuning: use bf16 or fp32")
        self.amp = torch.bfloat16 if self.precision == "bf16" else None
        self.index, self.val_index = (load_index(cfg.data.train_shards, cfg.data.cache_dir),
                                      load_index(cfg.data.val_shards, cfg.data.cache_dir))
        self.num_classes = m.num_classes or self.index.num_classes
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes: the train shards' _info.json gives {self.num_classes} classes; "
                              f"set it")
        self.schedule = schedule_for(cfg.curriculum, m.img_size, m.patch_size)
        self.engine, self.optimizer, self.ema = self._engine()
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        self.base_lr = cfg.optim.lr or cfg.optim.blr * self.global_batch / 256
        self.mean = torch.tensor(cfg.data.mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=self.dev).view(1, -1, 1, 1)
        self._data()
        cost = (lambda s: float(s * s)) if self.schedule.accounting == "compute" else (lambda s: 1.0)
        self.budget = Budget(self.schedule, m.img_size, cost, cfg.train.epochs,
                             self.full_steps * cfg.train.batch_size * self.world, flops=self.flops_per_image())
        grow = cfg.curriculum.grow_micro_batch and self.cached is None  # the one mechanism of both engines
        self.accum = Accumulation(cfg.train.grad_accum, m.img_size, grow=grow)
        if grow and cfg.train.grad_accum == 1 and min(self.schedule.sizes()) < m.img_size:
            log.info("curriculum.grow_micro_batch: train.grad_accum is 1, so there is no accumulation to trade for "
                     "bigger micro-batches at low resolution (set batch_size / k and grad_accum k to allow it)")
        self.cur_size = m.img_size
        self.tb = Scalars(self.out / "tensorboard")
        self.resume()
        self.record_start(mode=cfg.mode, global_batch=self.global_batch, base_lr=self.base_lr,
                          drop_path=effective_drop_path(cfg))
        self.metrics = TrainMetrics(self.tb, cfg.log.every_steps, self.dev,
                                    self.budget.estimate_steps(self.global_batch, cfg.train.max_steps),
                                    self.counters.step, cfg.mode, cfg.log.progress_bar)
        self.metrics.start(self.counters.samples)

    def flops_per_image(self) -> Callable[[int], float]:
        """Training FLOPs of one image at a size, for the ``flops`` counters (``final.json``): a ViT's analytic
        count (``vit_classifier_flops_per_image``); any other model's forward measured once at the final size
        (``measured_forward_flops``) x 3, scaled by (B / final)^2. A linear probe trains only its head: on cached
        features the head's FLOPs, else one encoder forward + the head's training FLOPs."""
        m, cfg = self.cfg.model, self.cfg
        if m.name == "vit":
            def full(s: int) -> float:
                return vit_classifier_flops_per_image(s, m.patch_size, m.embed_dim, m.depth, self.num_classes,
                                                      m.mlp_ratio, m.in_chans)
        else:
            module = self.engine.module
            x = torch.zeros(1, m.in_chans, m.img_size, m.img_size, device=self.dev)
            was_training = module.training
            module.eval()
            with self.autocast():
                base = measured_forward_flops(module, (x.to(next(module.parameters()).dtype),))
            module.train(was_training)

            def full(s: int) -> float:
                return TRAINING_FLOPS_PER_FORWARD * base * (s / m.img_size) ** 2
        if cfg.mode != "linprobe":
            return full
        head = TRAINING_FLOPS_PER_FORWARD * 2.0 * m.embed_dim * self.num_classes
        if self.cached is not None:
            return lambda s: head
        return lambda s: full(s) / TRAINING_FLOPS_PER_FORWARD + head

    def _engine(self):
        import deepspeed

        cfg, m = self.cfg, self.cfg.model
        model, report = C.build_for_config(cfg, self.num_classes, sorted(set(self.schedule.sizes()) | {m.img_size}))
        if report is not None:
            log.info("pre-trained encoder: %s", report.summary())
            if D.is_main():
                write_report(report, self.out)
        # what follows the stage size: a ViT's pos-embed, a Swin's windows and bias tables (with their moments)
        self.resize_kind = None if cfg.mode == "linprobe" else (
            "pos_embed" if C.has_resizable_pos_embed(model) else "swin" if C.is_swin(model) else None)
        self.resizable = self.resize_kind is not None
        self.swin_final_windows = C.swin_final_windows(model) if self.resize_kind == "swin" else ()
        if self.resizable and len(set(self.schedule.sizes())) > 1 and cfg.train.zero_stage != 0:
            what = "the pos-embed" if self.resize_kind == "pos_embed" else "the Swin windows and bias tables"
            raise ConfigError(f"resizing {what} at curriculum stage changes needs train.zero_stage=0")
        model.to(self.dev)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)  # mixup / erasing / drop path differ over ranks
        np.random.seed(cfg.train.seed + 1000 * self.rank)
        ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema.decay, device=self.dev)
        ds_cfg = deepspeed_config(cfg.train.batch_size, cfg.train.grad_accum, self.world, "fp32",
                                  cfg.train.zero_stage, cfg.optim.gradient_clipping)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model),
                                                       config=ds_cfg)
        return engine, optimizer, ema

    def _data(self) -> None:
        cfg, a = self.cfg, self.cfg.augment
        eval_batch = cfg.eval.batch_size or cfg.train.batch_size
        # labels are checked against num_classes: a bad one makes its sample corrupt (training) / unreadable (eval)
        bounds = dict(max_pixels=cfg.data.max_image_pixels, max_member_bytes=cfg.data.max_member_bytes)
        self.val_loader = EvalLoader(self.val_index, eval_batch, self.world, self.rank, cfg.model.img_size,
                                     cfg.data.num_workers, num_classes=self.num_classes, **bounds)
        self.loaders.append(self.val_loader)
        self.cached = self.mixup = self.erasing = None
        if cfg.mode == "linprobe" and cfg.linprobe.cache_features and a.crop == "center":
            t = time.time()
            train = EvalLoader(self.index, eval_batch, self.world, self.rank, cfg.model.img_size, cfg.data.num_workers,
                               num_classes=self.num_classes, **bounds)
            self.loaders.append(train)
            with self.autocast():
                self.cached = FeatureCache(self.engine.module.features, train, self.val_loader, self.mean, self.std,
                                           self.dev)
            self.full_steps = self.cached.steps_per_epoch(self.world, cfg.train.batch_size, cfg.train.grad_accum)
            if self.full_steps == 0:
                raise ConfigError("train.batch_size x ranks is larger than the train split")
            log.info("linear probe: features of %d + %d images extracted in %.1f s", len(self.cached.train_ids),
                     int((self.cached.val[1] >= 0).sum()), time.time() - t)
            return
        aug = AugmentConfig(size=cfg.model.img_size, scale=(cfg.data.crop_scale_min, cfg.data.crop_scale_max),
                            hflip=cfg.data.hflip, randaug_magnitude=-1.0, randaug_mstd=a.randaug_mstd,
                            train=a.crop == "random")
        spec = StreamSpec(self.index, cfg.train.batch_size, self.world, self.rank, cfg.data.num_workers,
                          cfg.train.seed, cfg.data.shuffle_buffer, aug, steps_multiple=cfg.train.grad_accum,
                          decode=cfg.data.decode, num_classes=self.num_classes, require_labels=True, **bounds)
        self.loader = ShardLoader(spec, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                                  decode_device=self.dev)
        self.loaders.append(self.loader)
        self.full_steps = self.loader.steps_in_epoch(None)
        if uses_mixup(cfg):
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, label_smoothing=a.smoothing,
                               num_classes=self.num_classes)
        if a.reprob > 0 and cfg.mode != "linprobe":
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(a.reprob, mode="pixel", max_count=1, device=self.dev)

    def autocast(self):
        return torch.autocast(self.dev.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    # ---------------------------------------------------------------- the step
    def train_step(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> StepResult:
        """One micro-step: images at the stage's size (or cached features) -> loss -> backward/step."""
        cfg = self.cfg
        target = y
        if self.cached is None:
            self.set_size(stage.size)  # a ViT's learnable pos-embed (and its AdamW moments) follow the stage
            x = lowpass(x, stage.size, cfg.curriculum.lowpass)  # lanczos: the loader already resized to B
            if self.erasing is not None:
                x = self.erasing(x)
            if self.mixup is not None:
                x, target = self.mixup(x, y)
        with self.autocast():
            logits = self.engine(x) if self.cached is None else self.engine(x, features=True)
        smoothing = cfg.augment.smoothing if self.cached is None else 0.0
        loss = hooks.on_loss(self, per_sample_loss(logits.float(), target, smoothing).mean())
        agreed = self.agree(loss)  # the step's one collective
        images = x.shape[0] * self.world
        self.budget.consume(self.counters, stage.size, images)  # the data is spent whatever happens next
        if not agreed.nonfinite:
            set_lr(self.optimizer, self.lr())
            self.engine.set_gradient_accumulation_boundary(self.accum.boundary_next())
            self.engine.backward(loss)
            self.engine.step()
        return StepResult(loss.detach(), agreed)

    # ---------------------------------------------------------------- the loop (RunLifecycle.run drives it)
    def run_epoch(self) -> str:
        """Train to the end of the epoch; returns why it stopped: epoch_end, finished, rollback or preempted."""
        c = self.counters
        for x, y in self.batches():
            stage = self.schedule.stage_at(c.progress)
            c.micro_step += 1
            res = self.train_step(x, y, stage)
            verdict = self.handle_nonfinite(res.agreed.nonfinite)  # skip, or roll back after several
            if verdict == "rollback":
                return "rollback"
            if verdict == "skip":
                continue
            self.metrics.add_loss(res.loss)
            if not self.accum.completed():
                continue
            c.step += 1
            if self.ema is not None:
                self.ema.update(self.engine.module, step=c.step)
            self.metrics.step(c.step, c.samples, self.scalars)
            hooks.after_step(self)
            if res.agreed.stop:
                return "preempted"
            if self.checkpointer.due_after_step(c.step, res.agreed.save_due):
                self.save()
            if self.budget.done(c, self.cfg.train.max_steps):
                return "epoch_end" if c.step_in_epoch >= self.full_steps else "finished"
        return "epoch_end"

    def batches(self):
        """(input, labels) micro-batches for the rest of the epoch: cached features, or normalised images (at low
        resolution with ``curriculum.grow_micro_batch``, several loader batches merged; the merge factor changes
        only between optimizer steps); each loader step's RandAugment magnitude is its own stage's."""
        c, cfg = self.counters, self.cfg
        if self.cached is not None:
            for x, y in self.cached.batches(c.epoch, c.step_in_epoch, self.full_steps, cfg.train.batch_size,
                                            self.world, self.rank, cfg.train.seed):
                c.step_in_epoch += 1
                yield x, y
            return
        magnitude = self.magnitude(self.schedule.stage_at(c.progress))
        replays = step_replays(self.budget, cfg.curriculum.replay, c.progress, self.full_steps, c.step_in_epoch,
                               cfg.train.batch_size * self.world, 1.0, cfg.train.grad_accum, self.accum.merge_for)
        self.loader.start_epoch(c.epoch, c.step_in_epoch, None, magnitude=magnitude, out_sizes=self.lanczos_plan(),
                                magnitudes=self.magnitude_plan(), replays=replays)

        def numbered():
            for b in self.loader:
                c.step_in_epoch += 1
                yield b

        for group in self.accum.groups(numbered(), lambda: self.schedule.stage_at(c.progress).size, self.set_merge):
            images = group[0]["image"] if len(group) == 1 else torch.cat([b["image"] for b in group])
            labels = group[0]["label"] if len(group) == 1 else torch.cat([b["label"] for b in group])
            self.decoded_local += sum(int(b["fresh"].sum()) for b in group)
            yield normalise(images, self.mean, self.std, self.dev), labels.to(self.dev)

    def end_epoch(self) -> None:
        c, cfg = self.counters, self.cfg
        c.epoch, c.step_in_epoch = c.epoch + 1, 0
        done = self.budget.done(c, cfg.train.max_steps)
        if c.epoch % cfg.eval.every_epochs == 0 or done:
            self.evaluate_and_keep_best(c.epoch)
        if not done and self.checkpointer.due_at_epoch_end(c.epoch):
            self.save(epoch_end=c.epoch - 1)

    # ---------------------------------------------------------------- step parts
    def lanczos_plan(self) -> list[int] | None:
        """``curriculum.lowpass: lanczos``: the B of every loader step of the epoch (from the progress now), which
        the workers Lanczos-resize to after the final-size crop, flip and RandAugment (EfficientTrain++'s code)."""
        cfg, c = self.cfg, self.counters
        if cfg.curriculum.lowpass != "lanczos":
            return None
        return step_sizes(self.budget, c.progress, self.full_steps, c.step_in_epoch, cfg.train.batch_size * self.world,
                          1.0, cfg.train.grad_accum, self.accum.merge_for, exact=True)

    def magnitude(self, stage: Stage) -> float:
        """The RandAugment magnitude of ``stage`` (-1 = off). timm parses "rand-m<int>": stage magnitudes are
        rounded (integers already with max_magnitude 9, as EfficientTrain++'s m = stage index)."""
        cfg = self.cfg
        return float(round(stage.magnitude)) if cfg.augment.randaug and cfg.mode != "linprobe" else -1.0

    def magnitude_plan(self) -> list[float] | None:
        """The RandAugment magnitude of every loader step of the epoch, from its stage (``step_stages``: the walk
        the engine's progress will take, merged micro-batches included); None when RandAugment is off."""
        cfg, c = self.cfg, self.counters
        if self.magnitude(self.schedule.stages[0]) < 0:
            return None
        idx = step_stages(self.budget, c.progress, self.full_steps, c.step_in_epoch, cfg.train.batch_size * self.world,
                          1.0, cfg.train.grad_accum, self.accum.merge_for)
        mags = [self.magnitude(self.schedule.stages[i]) if i >= 0 else -1.0 for i in idx]
        for k in range(c.step_in_epoch + 1, len(mags)):
            if mags[k] != mags[k - 1]:
                log.info("curriculum: RandAugment magnitude %g from loader step %d of epoch %d (stage %d)", mags[k], k,
                         c.epoch, idx[k])
        return mags

    def set_merge(self, merge: int) -> None:
        """Micro-batch growth: ``merge`` loader batches per micro-batch from the next micro-step (DeepSpeed told)."""
        if merge != self.accum.merge:
            log.info("curriculum: micro-batch %d x %d accumulation steps (global batch %d)",
                     self.cfg.train.batch_size * merge, self.cfg.train.grad_accum // merge, self.global_batch)
        self.accum.apply(merge, self.engine, self.cfg.train.batch_size, self.global_batch)

    def lr(self) -> float:
        o = self.cfg.optim
        return lr_at(self.counters.progress, self.base_lr, o.min_lr, min(1.0, o.warmup_epochs / self.cfg.train.epochs))

    def set_size(self, size: int) -> None:
        if self.resize_kind == "pos_embed" and size != self.cur_size:
            C.resize_pos_embed_(self.engine.module, size, _torch_optimizer(self.optimizer))
            if self.ema is not None:
                C.resize_pos_embed_(self.ema.module, size)
            log.info("curriculum: input size %d, pos-embed resized to a %dx%d grid", size,
                     *self.engine.module.patch_embed.grid_size)
        elif self.resize_kind == "swin" and size != self.cur_size:
            windows = C.swin_windows(self.swin_final_windows, size, self.cfg.model.img_size)
            C.resize_swin_(self.engine.module, size, windows, _torch_optimizer(self.optimizer))
            if self.ema is not None:
                C.resize_swin_(self.ema.module, size, windows)
            log.info("curriculum: input size %d, Swin windows %s (bias tables resampled)", size,
                     "/".join(map(str, windows)))
        self.cur_size = size

    def scalars(self, loss: float, images_per_s: float) -> dict:
        stage = self.schedule.stage_at(self.counters.progress)
        self.sync_data_counters()
        return {"data/decoded_images": self.counters.decoded, "data/seen_images": self.counters.samples,
                "train/loss": loss, "train/lr": self.lr(), "perf/images_per_s": images_per_s,
                "train/micro_batch": self.cfg.train.batch_size * self.accum.merge,
                "curriculum/B": self.cur_size, "curriculum/progress": self.counters.progress,
                "curriculum/randaug_magnitude": max(self.magnitude(stage), 0.0)}

    def wall(self) -> float:
        return self.wall_before + time.time() - self.t0

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Top-1 / top-5 on the validation split at the final size, or with ``eval.at_stage_size`` at the size the
        model is at (the centre crop low-passed to it, as training does)."""
        model = self.engine.module
        model.eval()
        with self.autocast():
            if self.cached is not None:
                res = self.cached.evaluate(lambda f: model(f, features=True))
            else:
                size = self.cur_size if self.cfg.eval.at_stage_size else self.cfg.model.img_size
                res = {**self._evaluate_at(model, size), "input_size": size}
                if self.ema is not None:
                    res["ema_top1"] = self._evaluate_at(self.ema.module.eval(), size)["top1"]
        model.train()
        return res

    def _evaluate_at(self, model: torch.nn.Module, size: int) -> dict:
        ctx = contextlib.nullcontext()
        if self.resize_kind == "swin":  # a Swin at another size than its stage's runs at that size's window
            ctx = C.swin_at_size(model, size, C.swin_windows(self.swin_final_windows, size, self.cfg.model.img_size))
        with ctx:
            return evaluate(lambda x: model(at_size(x, size)), self.val_loader, self.mean, self.std, self.dev)

    def evaluate_and_keep_best(self, epoch: int) -> dict:
        res = self.evaluate()
        self.last_eval = (res, self.counters.step)
        keys = ("top1", "top5", "loss", "ema_top1", "input_size")
        self.tb.add({f"eval/{k}": v for k, v in res.items() if k in keys}, epoch)
        log.info("epoch %d: top-1 %.2f%%  top-5 %.2f%%  (%d images%s)%s", epoch, res["top1"], res["top5"],
                 res["count"], f" at {res['input_size']} px" if "input_size" in res else "",
                 f"  EMA top-1 {res['ema_top1']:.2f}%" if "ema_top1" in res else "")
        if res["top1"] > self.best["top1"]:
            self.best = {"top1": res["top1"], "top5": res["top5"], "epoch": epoch}
            self.export("best", self.engine.module, {**res, "epoch": epoch})
        return res

    # ---------------------------------------------------------------- checkpoints (the lifecycle's hooks)
    def sync_data_counters(self) -> None:
        """Fold every rank's decoded rows since the last call into ``counters.decoded`` (one collective; at log
        steps and before a checkpoint, which every rank reaches at the same step). Cached features: nothing."""
        if self.cached is None:
            self.counters.decoded += D.all_reduce_sum_int(self.decoded_local)
            self.decoded_local = 0

    def client_state(self) -> dict:
        self.sync_data_counters()
        state = {"counters": self.counters.to_dict(), "best": self.best, "wall_time_s": self.wall()}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def run_state(self) -> dict:
        # input_size: the stage size of the last step run (its pos-embed grid); the progress may already point
        # into the next stage, whose resize happens at the next step
        return {"counters": self.counters.to_dict(), "input_size": self.cur_size, "world_size": self.world}

    def restore(self, path: Path) -> None:
        saved = self.checkpointer.run_state(path)
        self.set_size(int(saved.get("input_size", self.cur_size)))  # shapes must match the saved tables to load
        client = self.checkpointer.load(self.engine, path)
        self.counters = Counters.from_dict(client["counters"])
        self.decoded_local = 0  # rows of steps the restore undoes
        self.best, self.wall_before = client["best"], client["wall_time_s"]
        if self.ema is not None and "ema" in client:
            self.ema.module.load_state_dict(client["ema"])
        self.accum.reset()

    # ---------------------------------------------------------------- outputs
    def export(self, name: str, module: torch.nn.Module, metrics: dict) -> None:
        if D.is_main():
            from safetensors.torch import save_file

            (self.out / name).mkdir(exist_ok=True)
            sd = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, str(self.out / name / "model.safetensors"))
            (self.out / name / "metrics.json").write_text(json.dumps(metrics, indent=1))

    def write_outputs(self) -> None:
        """Final evaluation (unless the last epoch end just made it), checkpoint, exports and ``final.json``."""
        c, cfg = self.counters, self.cfg
        res, at_step = self.last_eval
        if at_step != c.step:  # the budget ended mid-epoch (or max_steps): evaluate the final weights
            res = self.evaluate_and_keep_best(c.epoch + (c.step_in_epoch > 0))
        self.save()
        self.export("last", self.engine.module, res)
        if self.ema is not None:
            self.export("ema", self.ema.module, {"ema_top1": res.get("ema_top1")})
        if D.is_main():
            final = {"mode": cfg.mode, "top1": res["top1"], "top5": res["top5"], "loss": res["loss"],
                     "best_top1": self.best["top1"], "best_epoch": self.best["epoch"],
                     "epochs": round(c.epoch + c.step_in_epoch / self.full_steps, 3),
                     "steps": c.step, "samples": c.samples, "decoded": c.decoded, "flops": c.flops,
                     "wall_time_s": round(self.wall(), 2),
                     "val_count": res["count"], "val_id_sum": res["id_sum"], "val_unreadable": res["unreadable"],
                     "world_size": self.world, "global_batch": self.global_batch, "base_lr": self.base_lr,
                     "schedule": self.schedule.name, "nonfinite_skips": c.nonfinite_skips, "rollbacks": c.rollbacks,
                     **({"ema_top1": res["ema_top1"]} if "ema_top1" in res else {})}
            (self.out / "final.json").write_text(json.dumps(final, indent=1))
            log.info("finished: top-1 %.2f%% (best %.2f%% at epoch %d), %.2f epochs, %.0f s", res["top1"],
                     self.best["top1"], self.best["epoch"], final["epochs"], final["wall_time_s"])


def run_finetune(cfg: FinetuneConfig, resume: str = "auto") -> int:
    from mae_curriculum.engine.lifecycle import run_to_end

    return run_to_end(FinetuneRun(cfg, resume))
