"""`python -m llama3_jax.curate`: see `llama3_jax.curate.cli`."""

import sys

from llama3_jax.curate.cli import main

sys.exit(main())
