#!/usr/bin/env python
"""MAE pre-training. ``python pretrain.py --config configs/demo.yaml`` or ``deepspeed pretrain.py --config ...``."""

import sys

from mae_curriculum.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
