"""Inference: KV-cache generation (`decode.py`), the `generate` API and loading for
inference (`generate.py`), weight-only int8 (`quant.py`) and the command line (`cli.py`).

Imports: `llama3_jax.config`, `llama3_jax.parallel`, `llama3_jax.model`, `llama3_jax.formats`.
"""
