"""MAE pre-training under DeepSpeed with the curriculum and sample pruning.

The step (:meth:`PretrainRun.train_step`), as in the MAE paper's loop: uint8 batch -> device -> normalise ->
low-frequency crop to the stage's B (Fourier, on the device) -> MAE on a (B/p)^2 grid, masking seeded per batch
-> per-sample loss on the masked patches -> DeepSpeed backward/step, LR from progress. Progress (the fraction of
the budget spent, in images or FLOPs) drives the LR and the curriculum stage. Everything else has its own home:
the run lifecycle (resume, checkpoints, stop signal, status, exit codes) in :mod:`engine.lifecycle`, when to
checkpoint in :mod:`engine.checkpointer`, non-finite losses in :mod:`engine.nonfinite`, the budget in
:mod:`engine.progress`, accumulation in :mod:`engine.accumulation`, logging in :mod:`engine.metrics`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mae_curriculum.config import PretrainConfig, to_dict
from mae_curriculum.curriculum.flops import mae_flops_per_image
from mae_curriculum.curriculum.pruning import build_pruner
from mae_curriculum.curriculum.schedule import Stage, schedule_for
from mae_curriculum.data.index import load_index
from mae_curriculum.data.remote import is_remote
from mae_curriculum.data.loader import ShardLoader, StreamSpec, read_eval_samples, stage_crop_size
from mae_curriculum.data.transforms import AugmentConfig, lanczos_resize
from mae_curriculum.engine import checkpoint as ckpt
from mae_curriculum.engine import dist as D
from mae_curriculum.engine import hooks
from mae_curriculum.engine.accumulation import Accumulation
from mae_curriculum.engine.ds_config import deepspeed_config, resolve_precision
from mae_curriculum.engine.errors import EXIT_USAGE, TrainingError
from mae_curriculum.engine.inputs import at_size, lowpass, normalise
from mae_curriculum.engine.lifecycle import Agreement, RunLifecycle
from mae_curriculum.engine.logging import Scalars, reconstruction_grid, save_png
from mae_curriculum.engine.lr import lr_at, set_lr
from mae_curriculum.engine.metrics import TrainMetrics
from mae_curriculum.engine.optim import mae_param_groups
from mae_curriculum.engine.progress import Budget, step_replays, step_sizes
from mae_curriculum.engine.state import Counters
from mae_curriculum.models.mae import build_mae

log = logging.getLogger("mae_curriculum.pretrain")


def masking_seed(seed: int, epoch: int, batch_in_epoch: int, rank: int) -> int:
    """Masking noise is seeded per loader batch: the same masks whether batches are merged or not, and after a
    resume."""
    return (seed * 1_000_003 + epoch * 15_485_863 + batch_in_epoch * 7919 + rank * 104_729) % (2**62)


@dataclass
class MicroBatch:
    images: torch.Tensor  # uint8 (N, 3, S, S), on the host (on the device with data.decode gpu or data.crop device)
    ids: torch.Tensor  # global sample ids (pruning)
    corrupt: int  # samples replaced because they could not be read
    keys: list[tuple[int, int]]  # (epoch, batch in epoch) of each merged loader batch: seeds its masks
    fresh: int = 0  # rows decoded from their own sample (not a replay row, not a corrupt sample's stand-in)


@dataclass
class StepResult:
    loss: torch.Tensor  # the loss that was back-propagated (not synchronised)
    per_sample: torch.Tensor  # (N,) losses on the masked patches, for pruning
    agreed: Agreement  # what the ranks decided together: skip (non-finite), stop, save


class PretrainRun(RunLifecycle):
    def __init__(self, cfg: PretrainConfig, resume: str = "auto"):
        super().__init__(cfg, resume)
        self.mask_digests: dict[str, str] = {}  # sha1 of the keep mask per epoch: equal on every rank
        self.corrupt_local = 0  # corrupt / decoded rows of this rank since the last sync_data_counters()
        self.decoded_local = 0
        self.prepared_size: int | None = None
        self.vis_images: torch.Tensor | None = None
        self.epoch_scale = 1.0  # unpruned / pruned epoch length (set at each epoch start)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        self.begin()
        self.precision = resolve_precision(cfg.train.precision)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.index, self.val_index, self.loader = self._data()
        self.engine, self.optimizer = self._engine(build_mae(m))
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        self.base_lr = cfg.optim.lr or cfg.optim.blr * self.global_batch / 256
        self.schedule = schedule_for(cfg.curriculum, m.img_size, m.patch_size)
        self.full_steps = self.loader.steps_in_epoch(None)
        self.budget = Budget(self.schedule, m.img_size, self.flops_per_image, cfg.train.epochs,
                             self.full_steps * cfg.train.batch_size * self.world)
        self.pruning = cfg.pruning.method != "none"
        self.pruner = build_pruner(cfg.pruning.method, self.index.num_samples, cfg.train.seed, ratio=cfg.pruning.ratio,
                                   k=cfg.pruning.k, alpha=cfg.pruning.alpha, delta=cfg.pruning.delta)
        self.accum = Accumulation(cfg.train.grad_accum, m.img_size, cfg.curriculum.grow_micro_batch)
        self.mean = torch.tensor(cfg.data.mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=self.dev).view(1, -1, 1, 1)
        self.noise_gen = torch.Generator(device=self.dev)
        self.tb = Scalars(self.out / "tensorboard")
        self.resume()
        self.record_start(precision=self.precision, global_batch=self.global_batch, base_lr=self.base_lr)
        self.metrics = TrainMetrics(self.tb, cfg.log.every_steps, self.dev,
                                    self.budget.estimate_steps(self.global_batch, cfg.train.max_steps),
                                    self.counters.step, "pretrain", cfg.log.progress_bar)
        self.metrics.start(self.counters.samples)

    def _data(self):
        cfg = self.cfg
        train_dir, cache = cfg.data.train_shards, cfg.data.cache_dir
        if not is_remote(train_dir) and not Path(train_dir).is_dir() and cfg.data.synthetic_if_missing:
            self._make_demo_data(Path(train_dir).parent)
        index = load_index(train_dir, cache)
        val_index = load_index(cfg.data.val_shards, cache) if cfg.data.val_shards else index
        aug = AugmentConfig(size=cfg.model.img_size, scale=(cfg.data.crop_scale_min, cfg.data.crop_scale_max),
                            hflip=cfg.data.hflip, randaug_magnitude=-1.0)
        # labels are not needed for pre-training: a bad .cls does not cost a good image
        spec = StreamSpec(index, cfg.train.batch_size, self.world, self.rank, cfg.data.num_workers, cfg.train.seed,
                          cfg.data.shuffle_buffer, aug, steps_multiple=cfg.train.grad_accum, decode=cfg.data.decode,
                          require_labels=False, max_pixels=cfg.data.max_image_pixels,
                          max_member_bytes=cfg.data.max_member_bytes, crop=cfg.data.crop)
        loader = ShardLoader(spec, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                             decode_device=self.dev)
        self.loaders.append(loader)
        return index, val_index, loader

    def _make_demo_data(self, root: Path) -> None:
        if D.is_main():
            from mae_curriculum.data.synthetic import make_synthetic_dataset

            log.info("%s is missing: generating the procedural demo data set in %s", self.cfg.data.train_shards, root)
            d = self.cfg.data
            make_synthetic_dataset(root, d.synthetic_train_size, d.synthetic_val_size, d.synthetic_image_size,
                                   seed=self.cfg.train.seed)
        D.barrier()

    def _engine(self, model: torch.nn.Module):
        import deepspeed

        cfg = self.cfg
        fused = {"fused": True} if self.dev.type == "cuda" else {}
        optimizer = torch.optim.AdamW(mae_param_groups(model, cfg.optim.weight_decay), lr=0.0,
                                      betas=tuple(cfg.optim.betas), **fused)
        ds_cfg = deepspeed_config(cfg.train.batch_size, cfg.train.grad_accum, self.world, self.precision,
                                  cfg.train.zero_stage, cfg.optim.gradient_clipping)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        if cfg.train.compile:  # through DeepSpeed; static shapes: one graph per curriculum stage (per B)
            engine.compile(compile_kwargs={"dynamic": False})
        return engine, optimizer

    def flops_per_image(self, size: int) -> float:
        m = self.cfg.model
        return mae_flops_per_image(size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.decoder_embed_dim,
                                   m.decoder_depth, m.mlp_ratio, m.in_chans, m.mask_ratio)

    # ------------------------------------------------------------------ the step
    def train_step(self, mb: MicroBatch, stage: Stage) -> StepResult:
        """One micro-step of MAE at the stage's resolution B."""
        cfg = self.cfg
        self.prepare_grid(stage.size)  # grid, masking and sin-cos tables follow B
        x = normalise(mb.images, self.mean, self.std, self.dev)
        x = lowpass(x, stage.size, cfg.curriculum.lowpass)  # fourier: the central BxB of the spectrum, here
        noise = self.masking_noise(mb.keys, (stage.size // cfg.model.patch_size) ** 2)
        # the encoder sees x in the run's dtype, the loss target comes from the fp32 pixels (the official AMP loop)
        loss, per_sample, _, _ = self.engine(x.to(self.dtype), cfg.model.mask_ratio, noise, target=x)
        if cfg.pruning.method == "infobatch":  # InfoBatch rescales the kept low-loss samples
            weights = torch.from_numpy(self.pruner.loss_weights(mb.ids.numpy())).to(self.dev, torch.float32)
            loss = (per_sample * weights).mean()
        loss = hooks.on_loss(self, loss)
        agreed = self.agree(loss)  # the step's one collective
        images = x.shape[0] * self.world
        self.budget.consume(self.counters, stage.size, images, self.epoch_scale)  # spent whatever happens next
        if not agreed.nonfinite:  # a non-finite loss anywhere: every rank skips the step
            set_lr(self.optimizer, lr_at(self.counters.progress, self.base_lr, cfg.optim.min_lr, self.warmup))
            self.engine.set_gradient_accumulation_boundary(self.accum.boundary_next())
            self.engine.backward(loss)
            self.engine.step()
        return StepResult(loss.detach(), per_sample.detach(), agreed)

    # ------------------------------------------------------------------ the loop (RunLifecycle.run drives it)
    def run_epoch(self) -> str:
        """Train to the end of the epoch; returns why it stopped: epoch_end, finished, rollback or preempted."""
        c = self.counters
        self.begin_epoch()
        for mb in self.micro_batches():
            stage = self.schedule.stage_at(c.progress)
            c.micro_step += 1
            res = self.train_step(mb, stage)
            self.corrupt_local += mb.corrupt
            self.decoded_local += mb.fresh
            if self.pruning:
                self.record_losses(mb.ids, res.per_sample)
            verdict = self.handle_nonfinite(res.agreed.nonfinite)  # skip, or roll back after several
            if verdict == "rollback":
                return "rollback"
            if verdict == "skip":
                continue
            self.metrics.add_loss(res.loss)
            if not self.accum.completed():
                continue
            c.step += 1
            self.metrics.step(c.step, c.samples, lambda loss, ips: self.scalars(loss, ips, stage))
            hooks.after_step(self)
            if res.agreed.stop:
                return "preempted"
            if self.checkpointer.due_after_step(c.step, res.agreed.save_due):
                self.save()
            if self.budget.done(c, self.cfg.train.max_steps):
                return "epoch_end" if c.step_in_epoch >= self.epoch_steps else "finished"
        return "epoch_end"

    def begin_epoch(self) -> None:
        c = self.counters
        keep = None
        if self.pruning:  # the pruner also needs where this epoch ends (SeTa/InfoBatch anneal at delta)
            size = self.schedule.stage_at(c.progress).size
            keep = self.pruner.keep_mask(c.epoch, c.progress, min(1.0, c.progress + self.budget.epoch_progress(size)))
        if keep is not None:  # a fingerprint per epoch: every rank must select the same samples
            self.mask_digests[str(c.epoch)] = hashlib.sha1(np.packbits(keep).tobytes()).hexdigest()[:16]
            self.tb.add({f"pruning/{k}": v for k, v in self.pruner.stats().items()}, c.step)
        self.epoch_steps = self.loader.steps_in_epoch(keep)
        self.epoch_scale = self.full_steps / self.epoch_steps  # a pruned epoch still counts as one epoch
        plan = out = None  # data.stage_sized_decode: the size S >= B each step is cropped to (constant per window)
        cfg, m = self.cfg, self.cfg.model
        lanczos = cfg.curriculum.lowpass == "lanczos"  # the loader also resizes each step to its exact B
        if cfg.data.stage_sized_decode or lanczos:
            sizes = step_sizes(self.budget, c.progress, self.epoch_steps, c.step_in_epoch,
                               cfg.train.batch_size * self.world, self.epoch_scale, cfg.train.grad_accum,
                               self.accum.merge_for, exact=lanczos)
            if cfg.data.stage_sized_decode:
                plan = [stage_crop_size(b, m.img_size, m.patch_size) if b else 0 for b in sizes]
            out = sizes if lanczos else None
        replays = step_replays(self.budget, cfg.curriculum.replay, c.progress, self.epoch_steps, c.step_in_epoch,
                               cfg.train.batch_size * self.world, self.epoch_scale, cfg.train.grad_accum,
                               self.accum.merge_for)
        self.loader.start_epoch(c.epoch, c.step_in_epoch, keep, magnitude=-1.0, sizes=plan, out_sizes=out,
                                replays=replays)

    def micro_batches(self):
        """The rest of the epoch as micro-batches: single loader batches, or at low resolution with
        ``grow_micro_batch`` several merged (the merge factor changes only between optimizer steps)."""
        c = self.counters

        def numbered():
            for batch in self.loader:
                c.step_in_epoch += 1
                yield batch, (c.epoch, c.step_in_epoch)

        for pending in self.accum.groups(numbered(), lambda: self.schedule.stage_at(c.progress).size, self.set_merge):
            if len({tuple(b["image"].shape[-2:]) for b, _ in pending}) > 1:  # the size plan prevents this
                raise TrainingError(f"loader batches of different sizes in one micro-batch at step "
                                    f"{c.step_in_epoch} of epoch {c.epoch}")
            merged = {k: torch.cat([b[k] for b, _ in pending]) for k in ("image", "id", "corrupt", "fresh")}
            if merged["image"].shape[-1] < self.schedule.stage_at(c.progress).size:
                raise TrainingError(f"the loader cropped step {c.step_in_epoch} of epoch {c.epoch} to "
                                    f"{merged['image'].shape[-1]} px, below the stage's B "
                                    f"{self.schedule.stage_at(c.progress).size} (size plan out of step)")
            yield MicroBatch(merged["image"], merged["id"], int(merged["corrupt"].sum()), [k for _, k in pending],
                             fresh=int(merged["fresh"].sum()))

    def end_epoch(self) -> None:
        c = self.counters
        ep = c.epoch
        c.epoch, c.step_in_epoch = ep + 1, 0
        if self.budget.done(c, self.cfg.train.max_steps):
            return  # the final checkpoint and grid follow
        if self.cfg.log.vis_every_epochs and (ep + 1) % self.cfg.log.vis_every_epochs == 0:
            self.visualise(f"epoch{ep:04d}")
        if self.checkpointer.due_at_epoch_end(ep + 1):
            self.save(epoch_end=ep)

    # ------------------------------------------------------------------ step parts
    @property
    def warmup(self) -> float:
        return min(1.0, self.cfg.optim.warmup_epochs / self.cfg.train.epochs)

    def prepare_grid(self, size: int) -> None:
        if size != self.prepared_size:
            self.engine.module.prepare_grid(size, self.dev, self.dtype)
            self.prepared_size = size

    def masking_noise(self, keys: list[tuple[int, int]], num_patches: int) -> torch.Tensor:
        parts = []
        for epoch, k in keys:
            self.noise_gen.manual_seed(masking_seed(self.cfg.train.seed, epoch, k, self.rank))
            parts.append(torch.rand(self.cfg.train.batch_size, num_patches, generator=self.noise_gen, device=self.dev))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def set_merge(self, merge: int) -> None:
        """Tell DeepSpeed: micro-batch x merge, accumulation / merge, the global batch unchanged."""
        self.accum.apply(merge, self.engine, self.cfg.train.batch_size, self.global_batch)

    def record_losses(self, ids: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Per-sample losses of all ranks to the pruner (all-gathered: every rank keeps the same scores)."""
        ids = ids.to(self.dev)
        if self.world > 1:
            import torch.distributed as dist

            all_ids = [torch.empty_like(ids) for _ in range(self.world)]
            all_loss = [torch.empty_like(per_sample, dtype=torch.float32) for _ in range(self.world)]
            dist.all_gather(all_ids, ids)
            dist.all_gather(all_loss, per_sample.float().contiguous())
            ids, per_sample = torch.cat(all_ids), torch.cat(all_loss)
        self.pruner.update(ids.cpu().numpy(), per_sample.float().cpu().numpy())

    def scalars(self, loss: float, images_per_s: float, stage: Stage) -> dict:
        c = self.counters
        self.sync_data_counters()
        g = self.optimizer.param_groups[0]
        return {"train/loss": loss, "train/lr": g["lr"] / g.get("lr_scale", 1.0),
                "train/micro_batch": self.cfg.train.batch_size * self.accum.merge, "perf/images_per_s": images_per_s,
                "curriculum/B": stage.size, "curriculum/stage": stage.index, "curriculum/progress": c.progress,
                "curriculum/gflops_per_image": self.flops_per_image(stage.size) / 1e9,
                "curriculum/cumulative_pflops": c.flops / 1e15, "data/epoch": c.epoch,
                "data/corrupt_samples": c.corrupt_samples, "data/decoded_images": c.decoded,
                "data/seen_images": c.samples}

    def sync_data_counters(self) -> None:
        """Fold every rank's corrupt / decoded rows since the last call into the counters (one collective; at log
        steps and before a checkpoint, which every rank reaches at the same step)."""
        c = self.counters
        corrupt, decoded = D.all_reduce_sum_ints([self.corrupt_local, self.decoded_local])
        c.corrupt_samples += corrupt
        c.decoded += decoded
        self.corrupt_local = self.decoded_local = 0

    # ------------------------------------------------------------------ checkpoints (the lifecycle's hooks)
    def client_state(self) -> dict:
        self.sync_data_counters()
        return {"counters": self.counters.to_dict(), "pruner": self.pruner.state_dict()}

    def run_state(self) -> dict:
        return {"model": to_dict(self.cfg.model), "world_size": self.world, "batch_size": self.cfg.train.batch_size,
                "counters": self.counters.to_dict()}

    def status_extra(self) -> dict:
        return {"keep_mask_sha1": self.mask_digests}

    def restore(self, path: Path) -> None:
        saved = self.checkpointer.run_state(path)
        if saved:
            mine = to_dict(self.cfg.model)
            diff = [k for k in mine if k not in ("mask_ratio", "norm_pix_loss") and saved["model"].get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise TrainingError(f"checkpoint {path} has a different model: model.{k} is {saved['model'].get(k)} "
                                    f"there and {mine[k]} here", EXIT_USAGE)
        client = self.checkpointer.load(self.engine, path)
        self.counters = Counters.from_dict(client["counters"])
        self.decoded_local = 0  # rows of steps the restore undoes (their samples are undone too)
        if saved and (saved.get("world_size"), saved.get("batch_size")) != (self.world, self.cfg.train.batch_size):
            log.warning("resuming with a different world size or batch size (%s x %s -> %s x %s): the data order "
                        "restarts at the current epoch's beginning", saved.get("world_size"), saved.get("batch_size"),
                        self.world, self.cfg.train.batch_size)
            self.counters.step_in_epoch = 0
        if "pruner" in client:
            self.pruner.load_state_dict(client["pruner"])
        self.accum.reset()

    # ------------------------------------------------------------------ outputs
    def write_outputs(self) -> None:
        """Final checkpoint, reconstruction grid, DeepSpeed-free export and ``final.json``."""
        import json

        c, cfg = self.counters, self.cfg
        final_loss = self.metrics.final_loss()
        self.save()
        self.visualise("final")
        if D.is_main():
            paths = ckpt.export_safetensors(self.engine.module, self.out / "export", to_dict(cfg.model))
            summary = {**c.to_dict(), "final_loss": final_loss, "export": {k: str(v) for k, v in paths.items()},
                       "schedule": self.schedule.name, "status": "finished"}
            if cfg.train.compile:
                from torch._dynamo.utils import counters

                summary["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
            (self.out / "final.json").write_text(json.dumps(summary, indent=1))
            log.info("finished: step %d, epoch %d, %d images, final loss %.4f, %.3f PFLOP", c.step, c.epoch,
                     c.samples, final_loss, c.flops / 1e15)

    @torch.no_grad()
    def visualise(self, tag: str) -> None:
        """Original / masked / reconstruction / reconstruction + visible for a few validation images at the B of
        the moment."""
        cfg = self.cfg
        if self.vis_images is None:
            self.vis_images = read_eval_samples(self.val_index, cfg.log.vis_num_images, cfg.model.img_size)[0]
        stage = self.schedule.stage_at(self.counters.progress)
        images = self.vis_images
        if cfg.curriculum.lowpass == "lanczos":
            images = lanczos_resize(images, stage.size)
        x = at_size(normalise(images, self.mean, self.std, self.dev), stage.size)
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


def run_pretrain(cfg: PretrainConfig, resume: str = "auto") -> int:
    from mae_curriculum.engine.lifecycle import run_to_end

    return run_to_end(PretrainRun(cfg, resume))
