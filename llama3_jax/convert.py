"""`python -m llama3_jax.convert`: the `llama3-convert` command (`llama3_jax/formats/convert.py`)."""

import sys

from llama3_jax.formats.convert import main

if __name__ == "__main__":
    sys.exit(main())
