"""Inference: generating tokens from a model's parameters.

Imports: `llama3_jax.config`, `llama3_jax.model`, `llama3_jax.parallel`.
"""
