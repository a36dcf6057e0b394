"""DeepSpeed configuration built from our typed config: every default that matters is set explicitly."""

from __future__ import annotations

import torch


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a GPU (DeepSpeed on the CPU supports fp32 and bf16)")
    return precision


def deepspeed_config(micro_batch: int, grad_accum: int, world: int, precision: str, zero_stage: int,
                     gradient_clipping: float) -> dict:
    return {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(gradient_clipping),  # DeepSpeed 0.19 defaults to 1.0: MAE does not clip
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
