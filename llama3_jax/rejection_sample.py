"""`python -m llama3_jax.rejection_sample`: the `llama3-rejection-sample` command (`llama3_jax/align/rejection.py`)."""

import sys

from llama3_jax.align.rejection import main

if __name__ == "__main__":
    sys.exit(main())
