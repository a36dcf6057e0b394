#!/usr/bin/env python
"""Fine-tuning / linear probe / supervised. ``python finetune.py --config configs/finetune_demo.yaml`` or
``deepspeed finetune.py --config ...``."""

import sys

from mae_curriculum.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
