"""Parallelism from outside the model: the logical-axis rule table, meshes, and
multi-process start-up. The pipeline schedule, which computes the train step's gradients
over the `pp` axis, lives with the step in `llama3_jax.train.pipeline`.

Imports: `llama3_jax.config` only.
"""
