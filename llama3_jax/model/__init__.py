"""The model: Llama 3 in Flax NNX, attention implementations, and the training loss.

Imports: `llama3_jax.config` and `llama3_jax.parallel.sharding` (for `constrain`, which
names activation axes; the model holds no mesh code).
"""

from llama3_jax.model.loss import cross_entropy, loss_sum
from llama3_jax.model.model import (LAYER_PARAMS, PARAM_AXES, Llama, flops_per_token, forward, param_count,
                                    param_shapes)

__all__ = ["LAYER_PARAMS", "PARAM_AXES", "Llama", "cross_entropy", "flops_per_token", "forward", "loss_sum",
           "param_count", "param_shapes"]
