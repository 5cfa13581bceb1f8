"""Pretrain Llama 3: `python train.py` trains a small model on this Python's standard library.

    python train.py --config CONFIG --mesh MESH --steps N --out DIR [section.key=value ...]

The loop is `llama3_jax/train/loop.py` (also installed as the `llama3-train` command).
"""

import sys

from llama3_jax.train.loop import cli

if __name__ == "__main__":
    sys.exit(cli())
