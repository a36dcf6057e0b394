"""Shared pieces of the benchmark scripts: model presets, the training step, timing, environment, output.

Every script runs on CUDA when a GPU is present and on the CPU otherwise; figures are only comparable on the
same machine, torch version and thread count, which is why every JSON result carries ``env`` (see
:func:`environment`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python benchmarks/x.py`` from anywhere, installed or not
    sys.path.insert(0, str(ROOT))

from mae_curriculum.curriculum.flops import mae_flops_per_image  # noqa: E402
from mae_curriculum.curriculum.schedule import scale_size  # noqa: E402
from mae_curriculum.engine.optim import mae_param_groups  # noqa: E402
from mae_curriculum.models.mae import MaskedAutoencoderViT  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# model presets
# --------------------------------------------------------------------------------------------------------------

# ``tiny`` is the model of the test suite (tests/conftest.py TINY); ``demo`` is configs/demo.yaml's model;
# ``vit_b`` / ``vit_l`` are the MAE paper's encoders with the 512-d x 8 decoder (configs/vit_b.yaml, vit_l.yaml).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=2, norm_pix_loss=False),
    "demo": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
                 decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True),
    "vit_b": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                  decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True),
    "vit_l": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                  decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True),
}
MASK_RATIO = 0.75
REFERENCE_SIZE = 224
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense (datasheet)


def preset(name: str, img_size: int | None = None) -> dict[str, Any]:
    if name not in PRESETS:
        raise SystemExit(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[name])
    if img_size:
        if img_size % cfg["patch_size"]:
            raise SystemExit(f"--img-size {img_size} must be a multiple of the patch size {cfg['patch_size']}")
        cfg["img_size"] = img_size
    return cfg


def build_model(cfg: dict[str, Any]) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**cfg)


def flops_per_image(cfg: dict[str, Any], size: int, mask_ratio: float = MASK_RATIO) -> float:
    """Training FLOPs per image (forward + backward) at input size ``size`` (mae_flops_per_image)."""
    return mae_flops_per_image(size, cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"],
                               cfg["decoder_embed_dim"], cfg["decoder_depth"], 4.0, 3, mask_ratio)


def scaled_sizes(final_size: int, patch: int, sizes_at_224: Sequence[int] = (96, 160, 192, 224)) -> list[int]:
    """``sizes_at_224`` scaled to ``final_size`` like the curriculum schedules do (deduplicated, in order)."""
    out: list[int] = []
    for b in sizes_at_224:
        s = scale_size(b, final_size, patch)
        if s not in out:
            out.append(s)
    return out


def batch_for(size: int, final_size: int, batch_at_final: int) -> int:
    """Micro-batch at ``size`` for equal pixels per step: ``batch_at_final * (final/size)^2`` (>= 1)."""
    return max(1, int(round(batch_at_final * (final_size / size) ** 2)))


# --------------------------------------------------------------------------------------------------------------
# device, precision, the step
# --------------------------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no GPU is available")
    return dev


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def fused_adamw_supported(dev: torch.device) -> bool:
    """Whether ``AdamW(fused=True)`` works for fp32/bf16 parameters on ``dev`` (CUDA always; CPU in torch>=2.4)."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=dev))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def fused_attention_report(model: torch.nn.Module) -> dict[str, Any]:
    """Whether every timm attention block calls ``F.scaled_dot_product_attention`` (``fused_attn``)."""
    flags = [bool(getattr(m, "fused_attn", False)) for m in model.modules() if hasattr(m, "fused_attn")]
    return {"blocks": len(flags), "fused": sum(flags), "all_fused": bool(flags) and all(flags)}


@dataclass
class StepConfig:
    """How one training step is run.

    ``param_dtype``: dtype of the module's parameters (``bfloat16`` = what DeepSpeed's bf16 mode runs, here
    without its fp32 master copy); ``autocast``: None or the autocast dtype over fp32 parameters (the MAE
    paper's code: fp32 weights + fp16 autocast + GradScaler); ``item_per_step``: read ``loss.item()`` after
    every step (a host sync, as the MAE code does to check for NaN); ``fused``: AdamW(fused=True).
    """

    param_dtype: torch.dtype = torch.float32
    autocast: torch.dtype | None = None
    grad_scaler: bool = False
    fused: bool = False
    item_per_step: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    lr: float = 1.5e-4
    mask_ratio: float = MASK_RATIO


class Trainer:
    """Model + AdamW + one ``step(x)`` = forward, backward, optimizer step (the data is already on the device)."""

    def __init__(self, model_cfg: dict[str, Any], dev: torch.device, sc: StepConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.dev, self.sc, self.cfg = dev, sc, dict(model_cfg)
        self.model = build_model(model_cfg).to(dev)
        if sc.param_dtype != torch.float32:
            self.model = self.model.to(sc.param_dtype)
        self.model.train()
        kw = {"fused": True} if sc.fused else {}
        self.opt = torch.optim.AdamW(mae_param_groups(self.model, 0.05), lr=sc.lr, betas=(0.9, 0.95), **kw)
        self.scaler = torch.amp.GradScaler(dev.type) if sc.grad_scaler else None
        self.fn: Callable = self.model
        if sc.compile:
            self.fn = torch.compile(self.model, dynamic=False, backend=sc.compile_backend)
        self.loss_sum = torch.zeros((), device=dev)
        self.last_item = float("nan")

    @property
    def input_dtype(self) -> torch.dtype:
        return self.sc.param_dtype

    def _ctx(self):
        if self.sc.autocast is None:
            return nullcontext()
        return torch.autocast(self.dev.type, dtype=self.sc.autocast)

    def step(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        with self._ctx():
            loss = self.fn(x, self.sc.mask_ratio, noise)[0]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sc.item_per_step:
            self.last_item = loss.item()  # host sync, as in the MAE paper's loop
            if not math.isfinite(self.last_item):
                raise RuntimeError(f"non-finite loss {self.last_item}")
        else:
            self.loss_sum += loss.detach().float()
        return loss


class EngineTrainer:
    """The engine's own MAE step, :meth:`PretrainRun.train_step` through DeepSpeed (fp32 or bf16, one process),
    for timing: a real run is set up on a small procedural shard folder, then ``step(x_u8, size)`` runs the step
    at curriculum size ``size`` on a uint8 batch at the final size (normalise -> Fourier crop -> MAE ->
    the ranks' agreement -> backward/step), as in training."""

    def __init__(self, model_cfg: dict[str, Any], batch: int, workdir: Path, precision: str = "auto",
                 compile: bool = False):
        from mae_curriculum.config import PretrainConfig, load_config
        from mae_curriculum.data.synthetic import make_synthetic_dataset
        from mae_curriculum.engine import dist as D
        from mae_curriculum.engine.pretrain import MicroBatch, PretrainRun

        size = model_cfg["img_size"]
        data = make_synthetic_dataset(Path(workdir) / "data", train_size=2 * batch, val_size=8, size=size,
                                      samples_per_shard=2 * batch)
        over = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model_cfg.items()]
        over += [f"output_dir={Path(workdir) / 'run'}", f"data.train_shards={data / 'train'}",
                 f"data.val_shards={data / 'val'}", f"train.batch_size={batch}", "data.num_workers=0",
                 "log.progress_bar=false", "checkpoint.every_minutes=0", f"train.precision={precision}",
                 f"train.compile={str(compile).lower()}", "log.vis_every_epochs=0"]
        cfg = load_config(PretrainConfig, ROOT / "configs" / "demo.yaml", over)
        D.setup_rank_env()
        D.init_distributed()
        self.run = PretrainRun(cfg, resume="none")
        self.run.setup()
        self.batch, self._MicroBatch, self._k = batch, MicroBatch, 0
        self.model = self.run.engine.module
        self.loss_sum = torch.zeros((), device=self.run.dev)

    def step(self, x_u8: torch.Tensor, size: int) -> torch.Tensor:
        import dataclasses

        self._k += 1
        stage = dataclasses.replace(self.run.schedule.stages[-1], size=size)
        mb = self._MicroBatch(x_u8, torch.arange(x_u8.shape[0]), 0, [(0, self._k)])
        res = self.run.train_step(mb, stage)
        self.loss_sum += res.loss.float()
        return res.loss

    def close(self) -> None:
        self.run.close()


def time_steps(fn: Callable[[], Any], dev: torch.device, warmup: int, iters: int, repeats: int) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` blocks of ``iters`` calls, syncing the device only at
    block edges. Returns seconds per call: median and min over blocks, every block's mean, and the first
    warm-up call's time. On a shared machine the min is the better estimate of the undisturbed cost."""
    sync(dev)
    t0 = time.perf_counter()
    first = None
    for i in range(warmup):
        fn()
        if i == 0:
            sync(dev)
            first = time.perf_counter() - t0
    sync(dev)
    blocks = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        blocks.append((time.perf_counter() - t) / iters)
    return {"median_s": statistics.median(blocks), "min_s": min(blocks), "blocks_s": blocks,
            "iters_per_block": iters, "first_call_s": first if first is not None else float("nan")}


# --------------------------------------------------------------------------------------------------------------
# environment and output
# --------------------------------------------------------------------------------------------------------------


def environment(dev: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "cpu": _cpu_name(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        env["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], title: str = "") -> None:
    """``columns``: (key, header, format spec); missing/None values print as ``-``."""
    cells = [[("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    sys.stdout.flush()


def write_json(path: str | Path | None, obj: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    print(f"wrote {p}")


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dtype_from_name(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
