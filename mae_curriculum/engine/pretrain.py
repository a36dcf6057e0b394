"""MAE pre-training under DeepSpeed with the curriculum, sample pruning, checkpoints and fault handling.

One step: uint8 batch -> device -> normalise -> Fourier-crop to the stage's B (on the device) -> MAE at grid
(B/p)^2 -> loss -> DeepSpeed backward/step. Progress (0..1) counts the budget spent, in images or in FLOPs
(per the schedule's accounting), and drives both the LR and the curriculum stage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from mae_curriculum.config import PretrainConfig, to_dict
from mae_curriculum.curriculum.flops import mae_flops_per_image
from mae_curriculum.curriculum.fourier import fourier_crop
from mae_curriculum.curriculum.pruning import build_pruner
from mae_curriculum.curriculum.schedule import Schedule, build_schedule
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec, read_eval_samples
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.engine import checkpoint as ckpt
from mae_curriculum.engine import dist as D
from mae_curriculum.engine.ds_config import deepspeed_config, resolve_precision
from mae_curriculum.engine.logging import Scalars, reconstruction_grid, save_png
from mae_curriculum.engine.lr import lr_at, set_lr
from mae_curriculum.engine.state import Counters
from mae_curriculum.models.mae import build_mae

log = logging.getLogger("mae_curriculum.pretrain")

EXIT_PREEMPTED = 75  # checkpoint written after SIGTERM/SIGUSR1: requeue and resume
EXIT_DIVERGED = 3  # non-finite losses again after a rollback


class TrainingError(RuntimeError):
    """A run-level problem reported as one line (exit status 1 unless stated)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


# ------------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM / SIGUSR1; all ranks agree on it at the next step (all-reduce)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output_dir {path} is not writable: {e.strerror or e}", code=2) from None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def normalise(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dev: torch.device) -> torch.Tensor:
    x = images_u8.to(dev, non_blocking=True).float().div_(255.0)
    return x.sub_(mean).div_(std)


@dataclass
class Budget:
    """Turns consumed images at a resolution into training progress."""

    schedule: Schedule
    final_size: int
    flops_fn: object
    total_units: float

    def units(self, size: int, images: int) -> float:
        per = self.flops_fn(size) if self.schedule.accounting == "compute" else 1.0
        return per * images


# ------------------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------------------


class PretrainRun:
    def __init__(self, cfg: PretrainConfig, resume: str = "auto"):
        self.cfg = cfg
        self.resume_arg = resume
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.stop = StopFlag()
        self.counters = Counters()
        self._last_save_time = time.time()
        self._mask_digests: dict[str, str] = {}

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        check_output_dir(self.out)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.dev = D.device()
        self.world, self.rank = D.world_size(), D.rank()
        self.precision = resolve_precision(cfg.train.precision)
        self._prepare_data()

        self.model = build_mae(cfg.model)
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(self.model, cfg.optim.weight_decay, no_weight_decay_list=("cls_token", "mask_token"))
        fused = {"fused": True} if self.dev.type == "cuda" else {}
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), **fused)
        import deepspeed

        ds_cfg = deepspeed_config(cfg.train.batch_size, cfg.train.grad_accum, self.world, self.precision,
                                  cfg.train.zero_stage, cfg.optim.gradient_clipping)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=ds_cfg)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self._prepared_size = None
        if cfg.train.compile:  # through DeepSpeed; static shapes: one compile per curriculum stage (per B)
            self.engine.compile(compile_kwargs={"dynamic": False})
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        self.base_lr = cfg.optim.lr or cfg.optim.blr * self.global_batch / 256
        m = cfg.model
        self.schedule = build_schedule(cfg.curriculum.schedule, final_size=m.img_size, patch_size=m.patch_size,
                                       max_magnitude=cfg.curriculum.max_magnitude, custom=cfg.curriculum.stages or None,
                                       **({"accounting": cfg.curriculum.accounting} if cfg.curriculum.schedule == "custom" else {}))

        def flops_fn(size: int) -> float:
            return mae_flops_per_image(size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.decoder_embed_dim,
                                       m.decoder_depth, m.mlp_ratio, m.in_chans, m.mask_ratio)

        self.flops_fn = flops_fn
        self.full_steps = self.loader.steps_in_epoch(None)
        self.epoch_images = self.full_steps * cfg.train.batch_size * self.world
        per = flops_fn(m.img_size) if self.schedule.accounting == "compute" else 1.0
        self.budget = Budget(self.schedule, m.img_size, flops_fn, cfg.train.epochs * self.epoch_images * per)
        self.pruner = build_pruner(cfg.pruning.method, self.index.num_samples, cfg.train.seed, ratio=cfg.pruning.ratio,
                                   k=cfg.pruning.k, alpha=cfg.pruning.alpha, delta=cfg.pruning.delta)
        self.mean = torch.tensor(cfg.data.mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=self.dev).view(1, -1, 1, 1)
        self.tb = Scalars(self.out / "tensorboard")
        self._resume()
        if D.is_main():
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            info = {"git_commit": git_commit(), "world_size": self.world, "precision": self.precision,
                    "global_batch": self.global_batch, "base_lr": self.base_lr, "started": time.time(),
                    "resumed_from": self.resumed_from, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                    "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
            with open(self.out / "run_info.jsonl", "a") as f:
                f.write(json.dumps(info) + "\n")
        if D.is_main():
            self._write_status("running")
        self.stop.install()

    def _prepare_data(self) -> None:
        cfg = self.cfg
        train_dir = Path(cfg.data.train_shards)
        if not train_dir.is_dir() and cfg.data.synthetic_if_missing:
            root = train_dir.parent
            if D.is_main():
                from mae_curriculum.data.synthetic import make_synthetic_dataset

                log.info("%s is missing: generating the procedural demo data set in %s", train_dir, root)
                t0 = time.time()
                make_synthetic_dataset(root, cfg.data.synthetic_train_size, cfg.data.synthetic_val_size,
                                       cfg.data.synthetic_image_size, seed=cfg.train.seed)
                log.info("demo data written in %.1f s", time.time() - t0)
            D.barrier()
        self.index = load_index(train_dir)
        self.val_index = load_index(cfg.data.val_shards) if cfg.data.val_shards else self.index
        aug = AugmentConfig(size=cfg.model.img_size, scale=(cfg.data.crop_scale_min, cfg.data.crop_scale_max),
                            hflip=cfg.data.hflip, randaug_magnitude=-1.0)
        spec = StreamSpec(self.index, cfg.train.batch_size, D.world_size(), D.rank(), cfg.data.num_workers,
                          cfg.train.seed, cfg.data.shuffle_buffer, aug, steps_multiple=cfg.train.grad_accum,
                          decode=cfg.data.decode)
        self.loader = ShardLoader(spec, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                                  decode_device=D.device())

    def _resume(self) -> None:
        self.resumed_from = None
        arg = self.resume_arg
        existing = ckpt.find_resume(self.ckpt_dir)
        if arg == "none":
            if existing is not None:
                raise TrainingError(f"{self.ckpt_dir} already holds checkpoints: use --resume auto to continue "
                                    f"that run, or choose a new output_dir", code=2)
            return
        path = existing if arg == "auto" else Path(arg)
        if path is None:
            return
        if arg != "auto":
            if path.is_dir() and not (path / ckpt.MARKER).is_file():
                found = ckpt.find_resume(path)
                if found is None:
                    raise TrainingError(f"--resume {arg}: no complete checkpoint there", code=2)
                path = found
            elif not path.is_dir():
                raise TrainingError(f"--resume {arg}: no such checkpoint folder", code=2)
        self._load(path)
        self.resumed_from = str(path)
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch, progress %.4f)", path,
                 self.counters.step, self.counters.epoch, self.counters.step_in_epoch, self.counters.progress)

    def _load(self, path: Path) -> None:
        client_meta = path / "run_state.json"
        if client_meta.is_file():
            saved = json.loads(client_meta.read_text())
            mine = to_dict(self.cfg.model)
            diff = [k for k in mine if k not in ("mask_ratio", "norm_pix_loss") and saved["model"].get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise TrainingError(f"checkpoint {path} has a different model: model.{k} is {saved['model'].get(k)} "
                                    f"there and {mine[k]} here", code=2)
            if saved.get("world_size") != self.world or saved.get("batch_size") != self.cfg.train.batch_size:
                log.warning("resuming with a different world size or batch size (%s x %s -> %s x %s): the data "
                            "order restarts at the current epoch's beginning", saved.get("world_size"),
                            saved.get("batch_size"), self.world, self.cfg.train.batch_size)
        try:
            client = ckpt.load(self.engine, path)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e), code=2) from None
        self.counters = Counters.from_dict(client["counters"])
        if client_meta.is_file() and (saved.get("world_size") != self.world
                                      or saved.get("batch_size") != self.cfg.train.batch_size):
            self.counters.step_in_epoch = 0
        if "pruner" in client:
            self.pruner.load_state_dict(client["pruner"])

    # ---------------------------------------------------------------- checkpoints
    def save(self, epoch_end: int | None = None) -> None:
        c = self.counters
        state = {"counters": c.to_dict(), "pruner": self.pruner.state_dict()}
        f = self.cfg.faults
        hook = None
        if f.kill_during_save_at_step and c.step == f.kill_during_save_at_step:
            hook = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
        elif f.disk_full_at_step and c.step == f.disk_full_at_step:
            def hook():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        try:
            path = ckpt.save(self.engine, self.ckpt_dir, c.step, state, before_marker=hook)
        except ckpt.CheckpointError as e:
            raise TrainingError(str(e)) from None
        if D.is_main():
            meta = {"model": to_dict(self.cfg.model), "world_size": self.world,
                    "batch_size": self.cfg.train.batch_size, "counters": c.to_dict()}
            (path / "run_state.json").write_text(json.dumps(meta, indent=1))
            if epoch_end is not None:
                ckpt.mark_epoch_end(path, epoch_end)
            ckpt.apply_retention(self.ckpt_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every_epochs, {})
        D.barrier()
        self._last_save_time = time.time()
        self.tb.add({"checkpoint/step": c.step}, c.step)
        kill_at = self.cfg.faults.kill_after_save_at_step
        if kill_at and c.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # ---------------------------------------------------------------- visualisation
    @torch.no_grad()
    def visualise(self, tag: str) -> None:
        cfg = self.cfg
        if not hasattr(self, "_vis"):
            self._vis = read_eval_samples(self.val_index, cfg.log.vis_num_images, cfg.model.img_size)[0]
        stage = self.schedule.stage_at(self.counters.progress)
        x = normalise(self._vis, self.mean, self.std, self.dev)
        if stage.size != cfg.model.img_size:
            x = fourier_crop(x, stage.size)
        model = self.engine.module
        was_training = model.training
        model.eval()
        g = torch.Generator(device=self.dev).manual_seed(1234)
        noise = torch.rand(x.shape[0], (stage.size // cfg.model.patch_size) ** 2, generator=g, device=self.dev)
        # .forward, not __call__: with train.compile the module is compiled in place, and an eval/no-grad call
        # would trigger a recompile of the training graph
        _, _, pred, mask = model.forward(x.to(self.dtype), cfg.model.mask_ratio, noise)
        recon = model.reconstruct(x.float(), pred, mask)
        model.train(was_training)
        to01 = lambda t: (t.float() * self.std + self.mean).clamp(0, 1).cpu()  # noqa: E731
        grid = reconstruction_grid(to01(x), mask.cpu(), to01(recon), cfg.model.patch_size)
        if D.is_main():
            save_png(grid, self.out / "vis" / f"{tag}.png")
            self.tb.image("reconstruction", grid, self.counters.step)

    # ---------------------------------------------------------------- the loop
    def run(self) -> int:
        cfg, c = self.cfg, self.counters
        max_steps = cfg.train.max_steps
        total_steps_est = self._estimate_total_steps()
        pbar = None
        if D.is_main() and cfg.log.progress_bar:
            from tqdm import tqdm

            pbar = tqdm(total=total_steps_est, initial=min(c.step, total_steps_est), unit="step",
                        dynamic_ncols=True, desc="pretrain")
        self._rollback_from: str | None = None
        window = 0  # successful micro-batches since the last optimizer step
        consecutive_bad = 0
        loss_sum = torch.zeros((), device=self.dev)
        loss_count = 0
        last_log_time, last_log_samples = time.time(), c.samples
        pending_epoch_save: int | None = None
        last_loss = float("nan")
        status = "finished"
        corrupt_local = 0
        pending: list = []  # loader batches waiting to be merged into one micro-batch
        self._merge = 1
        done = c.progress >= 1.0 or (max_steps and c.step >= max_steps)
        while not done:
            keep = self.pruner.keep_mask(c.epoch, c.progress) if cfg.pruning.method != "none" else None
            if keep is not None:  # a fingerprint per epoch: every rank must select the same samples
                self._mask_digests[str(c.epoch)] = hashlib.sha1(np.packbits(keep).tobytes()).hexdigest()[:16]
            stage = self.schedule.stage_at(c.progress)
            steps = self.loader.start_epoch(c.epoch, c.step_in_epoch, keep, magnitude=-1.0)
            kept_steps = epoch_steps = self.loader.steps_in_epoch(keep)
            prog_scale = self.full_steps / kept_steps  # a pruned epoch still counts as one epoch of progress
            if D.is_main() and cfg.pruning.method != "none":
                self.tb.add({f"pruning/{k}": v for k, v in self.pruner.stats().items()}, c.step)
            rolled_back = False
            for loader_batch in self.loader:
                c.step_in_epoch += 1
                if window == 0 and not pending:  # micro-batch size can change only between optimizer steps
                    merge = self._merge_factor(self.schedule.stage_at(c.progress).size)
                    if merge != self._merge:
                        self._set_merge(merge)
                pending.append((loader_batch, c.epoch, c.step_in_epoch))
                if len(pending) < self._merge:
                    continue
                batch = merge_batches([b for b, _, _ in pending])
                noise_keys = [(e, k) for _, e, k in pending]
                pending = []
                c.micro_step += 1
                stage = self.schedule.stage_at(c.progress)
                if stage.size != self._prepared_size:
                    self.engine.module.prepare_grid(stage.size, self.dev, self.dtype)
                    self._prepared_size = stage.size
                x = normalise(batch["image"], self.mean, self.std, self.dev)
                if stage.size != x.shape[-1]:
                    x = fourier_crop(x, stage.size)
                n = x.shape[0]
                noise = self._noise(noise_keys, (stage.size // cfg.model.patch_size) ** 2)
                loss, per_sample, _, _ = self.engine(x.to(self.dtype), cfg.model.mask_ratio, noise)
                if cfg.pruning.method == "infobatch":
                    w = torch.from_numpy(self.pruner.loss_weights(batch["id"].numpy())).to(self.dev, torch.float32)
                    loss = (per_sample * w).mean()
                if c.micro_step in cfg.faults.nan_at_micro_steps:
                    loss = loss * float("nan")
                save_due = (cfg.checkpoint.every_minutes > 0
                            and time.time() - self._last_save_time > 60 * cfg.checkpoint.every_minutes)
                # one collective, one host sync per micro-step: non-finite loss, stop signal, time to save
                flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                     torch.full((), float(self.stop.requested), device=self.dev),
                                     torch.full((), float(save_due), device=self.dev)])
                nonfinite, stop_req, save_due = (bool(v) for v in D.all_reduce_flags(flags).tolist())
                # account for the data consumed, whatever happens to the step
                images = n * self.world
                c.samples += images
                corrupt_local += int(batch["corrupt"].sum())
                c.progress += self.budget.units(stage.size, images) / self.budget.total_units * prog_scale
                c.flops += self.flops_fn(stage.size) * images
                c.full_flops += self.flops_fn(cfg.model.img_size) * images * prog_scale
                if cfg.pruning.method != "none":
                    self._gather_losses(batch["id"], per_sample.detach())
                if nonfinite:
                    c.nonfinite_skips += 1
                    consecutive_bad += 1
                    log.warning("non-finite loss at micro-step %d: step skipped (%d in a row)", c.micro_step, consecutive_bad)
                    self.tb.add({"faults/nonfinite_skips": c.nonfinite_skips}, c.step)
                    if consecutive_bad >= cfg.train.nan_skip_limit:
                        self._rollback(consecutive_bad)
                        c = self.counters  # the restored counters
                        consecutive_bad, window, rolled_back, pending = 0, 0, True, []
                        break
                    continue
                consecutive_bad = 0
                set_lr(self.optimizer, lr_at(c.progress, self.base_lr, cfg.optim.min_lr, self._warmup()))
                gas = cfg.train.grad_accum // self._merge
                self.engine.set_gradient_accumulation_boundary(window + 1 == gas)  # explicit, robust to skips
                self.engine.backward(loss)
                self.engine.step()
                window += 1
                loss_sum += loss.detach().float()
                loss_count += 1
                if window < gas:
                    continue
                window = 0
                c.step += 1
                if pbar is not None:
                    pbar.update(1)
                if c.step % cfg.log.every_steps == 0 or c.step == 1:
                    c.corrupt_samples += D.all_reduce_sum_int(corrupt_local)
                    corrupt_local = 0
                    last_loss = (loss_sum / max(1, loss_count)).item()
                    now = time.time()
                    ips = (c.samples - last_log_samples) / max(1e-9, now - last_log_time)
                    self.tb.add({"train/micro_batch": cfg.train.batch_size * self._merge, "train/loss": last_loss, "train/lr": self.optimizer.param_groups[0]["lr"]
                                 / self.optimizer.param_groups[0].get("lr_scale", 1.0),
                                 "perf/images_per_s": ips, "curriculum/B": stage.size,
                                 "curriculum/stage": stage.index, "curriculum/progress": c.progress,
                                 "curriculum/gflops_per_image": self.flops_fn(stage.size) / 1e9,
                                 "curriculum/cumulative_pflops": c.flops / 1e15, "data/epoch": c.epoch,
                                 "data/corrupt_samples": c.corrupt_samples}, c.step)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{last_loss:.4f}", B=stage.size, ep=c.epoch, ips=f"{ips:.0f}")
                    loss_sum.zero_()
                    loss_count = 0
                    last_log_time, last_log_samples = now, c.samples
                at_epoch_end = c.step_in_epoch >= epoch_steps
                finished = c.progress >= 1.0 - 1e-12 or (max_steps and c.step >= max_steps)
                if cfg.faults.kill_at_step and c.step == cfg.faults.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop_req:
                    log.warning("preemption signal received: saving a checkpoint at step %d and exiting (%d)",
                                c.step, EXIT_PREEMPTED)
                    self.save()
                    status = "preempted"
                    done = True
                    break
                every = cfg.checkpoint.every_steps
                if (every and c.step % every == 0) or save_due:
                    self.save()
                if finished:
                    if at_epoch_end:
                        c.epoch, c.step_in_epoch = c.epoch + 1, 0
                    done = True
                    break
                if at_epoch_end:
                    break
            if rolled_back or done:
                continue
            # epoch finished
            ep = c.epoch
            c.epoch += 1
            c.step_in_epoch = 0
            if cfg.log.vis_every_epochs and (ep + 1) % cfg.log.vis_every_epochs == 0:
                self.visualise(f"epoch{ep:04d}")
            if cfg.checkpoint.every_epochs and (ep + 1) % cfg.checkpoint.every_epochs == 0:
                self.save(epoch_end=ep)
        if pbar is not None:
            pbar.close()
        if status == "preempted":
            self._write_status(status)
            self.tb.close()
            return EXIT_PREEMPTED
        # finished: final checkpoint, export, reconstruction grid, summary
        if loss_count:
            last_loss = (loss_sum / loss_count).item()
        self.save()
        self.visualise("final")
        if D.is_main():
            paths = ckpt.export_safetensors(self.engine.module, self.out / "export", to_dict(cfg.model))
            summary = {**c.to_dict(), "final_loss": last_loss, "export": {k: str(v) for k, v in paths.items()},
                       "schedule": self.schedule.name, "status": status}
            if cfg.train.compile:
                from torch._dynamo.utils import counters

                summary["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
            (self.out / "final.json").write_text(json.dumps(summary, indent=1))
            log.info("finished: step %d, epoch %d, %d images, final loss %.4f, %.3f PFLOP",
                     c.step, c.epoch, c.samples, last_loss, c.flops / 1e15)
        self._write_status(status)
        self.tb.close()
        return 0

    def _write_status(self, status: str) -> None:
        """Every rank records how it ended (``ranks/rank<r>.json``); rank 0 also writes ``status.json``,
        which launch scripts can read: a ``deepspeed`` launcher that was itself signalled exits 1 whatever the
        ranks returned (when the ranks exit on their own it passes their status, 75 included)."""
        c = self.counters
        rec = {"status": status, "step": c.step, "samples": c.samples, "epoch": c.epoch,
               "step_in_epoch": c.step_in_epoch, "rank": self.rank, "world_size": self.world,
               "keep_mask_sha1": self._mask_digests}
        (self.out / "ranks").mkdir(exist_ok=True)
        (self.out / "ranks" / f"rank{self.rank}.json").write_text(json.dumps(rec))
        if D.is_main():
            tmp = self.out / "status.json.tmp"
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.out / "status.json")

    def _merge_factor(self, size: int) -> int:
        """How many loader batches form one micro-batch at resolution ``size``: the largest divisor of the
        accumulation steps not above (final/size)^2, so a micro-batch costs about what it costs at the final size
        (EfficientTrain++ grows the per-GPU batch at low resolution with fewer accumulation steps)."""
        if not self.cfg.curriculum.grow_micro_batch:
            return 1
        accum = self.cfg.train.grad_accum
        ratio = (self.cfg.model.img_size / size) ** 2
        return max(d for d in range(1, accum + 1) if accum % d == 0 and d <= ratio + 1e-9)

    def _set_merge(self, merge: int) -> None:
        """Tell DeepSpeed: micro-batch x merge, accumulation / merge, the global batch unchanged."""
        self._merge = merge
        self.engine.set_train_micro_batch_size(self.cfg.train.batch_size * merge)
        self.engine.set_train_batch_size(self.global_batch)

    def _noise(self, keys: list[tuple[int, int]], num_patches: int) -> torch.Tensor:
        """Masking noise seeded per loader batch (epoch, index in epoch, rank): identical whether batches are
        merged or not, and after a resume."""
        m = self.cfg.train.batch_size
        if not hasattr(self, "_gen"):
            self._gen = torch.Generator(device=self.dev)
        parts = []
        for epoch, k in keys:
            seed = (self.cfg.train.seed * 1_000_003 + epoch * 15_485_863 + k * 7919 + self.rank * 104_729) % (2**62)
            self._gen.manual_seed(seed)
            parts.append(torch.rand(m, num_patches, generator=self._gen, device=self.dev))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _warmup(self) -> float:
        return min(1.0, self.cfg.optim.warmup_epochs / self.cfg.train.epochs)

    def _estimate_total_steps(self) -> int:
        """Optimizer steps for the whole budget (for the progress bar), walking the stages."""
        total = 0.0
        for st in self.schedule.stages:
            images = (st.end - st.start) * self.budget.total_units / self.budget.units(st.size, 1)
            total += images / self.global_batch
        steps = int(math.ceil(total))
        if self.cfg.train.max_steps:
            steps = min(steps, self.cfg.train.max_steps)
        return steps

    def _gather_losses(self, ids: torch.Tensor, per_sample: torch.Tensor) -> None:
        ids = ids.to(self.dev)
        if self.world > 1:
            import torch.distributed as dist

            all_ids = [torch.empty_like(ids) for _ in range(self.world)]
            all_loss = [torch.empty_like(per_sample) for _ in range(self.world)]
            dist.all_gather(all_ids, ids)
            dist.all_gather(all_loss, per_sample.float().contiguous())
            ids, per_sample = torch.cat(all_ids), torch.cat(all_loss)
        self.pruner.update(ids.cpu().numpy(), per_sample.float().cpu().numpy())

    def _rollback(self, bad: int) -> None:
        path = ckpt.find_resume(self.ckpt_dir)
        if path is None:
            raise TrainingError(f"{bad} consecutive non-finite losses and no checkpoint to roll back to: stopping "
                                f"(lower optim.blr, enable optim.gradient_clipping, or check the data)", EXIT_DIVERGED)
        if self._rollback_from == str(path):
            raise TrainingError(f"{bad} consecutive non-finite losses again after rolling back to {path}: stopping "
                                f"(lower optim.blr, enable optim.gradient_clipping, or check the data)", EXIT_DIVERGED)
        log.error("%d consecutive non-finite losses: rolling back to %s (nothing is changed: same LR, same data)",
                  bad, path)
        skips, rollbacks = self.counters.nonfinite_skips, self.counters.rollbacks
        self._load(path)
        self.counters.nonfinite_skips = skips
        self.counters.rollbacks = rollbacks + 1
        self._rollback_from = str(path)
        self.tb.add({"faults/rollbacks": self.counters.rollbacks}, self.counters.step)


def merge_batches(batches: list[dict]) -> dict:
    if len(batches) == 1:
        return batches[0]
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def run_pretrain(cfg: PretrainConfig, resume: str = "auto") -> int:
    run = PretrainRun(cfg, resume)
    run.setup()
    return run.run()
