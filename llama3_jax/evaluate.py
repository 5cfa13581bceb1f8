"""`python -m llama3_jax.evaluate`: the `llama3-evaluate` command (`llama3_jax/eval/cli.py`)."""

import sys

from llama3_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
