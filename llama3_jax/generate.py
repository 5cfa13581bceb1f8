"""`python -m llama3_jax.generate`: the `llama3-generate` command (`llama3_jax/infer/cli.py`)."""

import sys

from llama3_jax.infer.cli import main

if __name__ == "__main__":
    sys.exit(main())
