"""Llama 3 pretraining in JAX/XLA."""

from llama3_jax.checkpoint import load
from llama3_jax.config import Config, ModelConfig, load_config
from llama3_jax.model import Llama

__all__ = ["Config", "Llama", "ModelConfig", "load", "load_config"]
