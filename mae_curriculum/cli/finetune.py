"""``python finetune.py --config configs/finetune_demo.yaml [key=value ...]`` (also under ``deepspeed`` and ``srun``).

Modes (``mode:`` in the config): MAE fine-tuning, linear probing, supervised training with the curriculum.
"""

from __future__ import annotations

import argparse
import sys

from mae_curriculum.cli.common import build_parser, run_cli


def _main(args: argparse.Namespace) -> int:
    from mae_curriculum.config import load_config
    from mae_curriculum.config_finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, args.config, args.overrides)  # validate before starting anything heavy

    from pathlib import Path

    from mae_curriculum.engine import dist as D
    from mae_curriculum.engine.finetune import run_finetune
    from mae_curriculum.engine.logging import setup_console
    from mae_curriculum.engine.lifecycle import check_output_dir

    check_output_dir(Path(cfg.output_dir))
    D.setup_rank_env(args.local_rank)
    D.init_distributed(cfg.train.dist_timeout_s)
    setup_console()
    return run_finetune(cfg, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("finetune.py", "MAE fine-tuning / linear probing / supervised training with the "
                                         "EfficientTrain++ curriculum, on DeepSpeed")
    return run_cli(_main, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
