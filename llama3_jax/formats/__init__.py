"""Checkpoint and tokenizer formats: our run directories (Orbax), Hugging Face, Meta, the
Llama 3 tokenizer and the default BPE; `load` and streaming weights onto a mesh.
`convert.py` is the command line over them.

Imports: `llama3_jax.config`, `llama3_jax.model`, `llama3_jax.data` (the default corpus).
"""
