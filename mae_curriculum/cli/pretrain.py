"""``python pretrain.py --config configs/demo.yaml [key=value ...]`` (also under ``deepspeed`` and ``srun``)."""

from __future__ import annotations

import argparse
import sys

from mae_curriculum.cli.common import build_parser, run_cli


def _main(args: argparse.Namespace) -> int:
    from mae_curriculum.config import PretrainConfig, load_config

    cfg = load_config(PretrainConfig, args.config, args.overrides)  # validate before starting anything heavy

    from pathlib import Path

    from mae_curriculum.engine import dist as D
    from mae_curriculum.engine.logging import setup_console
    from mae_curriculum.engine.lifecycle import check_output_dir
    from mae_curriculum.engine.pretrain import run_pretrain

    check_output_dir(Path(cfg.output_dir))  # before any process group: a bad folder fails in a second

    D.setup_rank_env(args.local_rank)
    D.init_distributed(cfg.train.dist_timeout_s)
    setup_console()
    return run_pretrain(cfg, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("pretrain.py", "MAE pre-training with the EfficientTrain++ curriculum, on DeepSpeed")
    return run_cli(_main, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
