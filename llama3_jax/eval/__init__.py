"""Evaluation with lm-evaluation-harness: `harness.JaxLM` (an `lm_eval` LM on our model and
tokenizer, sharded, with the KV-cache generator for generate_until), task running and
results (`harness.run_tasks`, `harness.Benchmark` for train.py), and the command
`python -m llama3_jax.evaluate` (`cli`). A synthetic needle-in-a-haystack evaluation,
`python -m llama3_jax.eval.needle` (`needle`: retrieval accuracy by context length and needle
depth; `haystack`: its seeded task generator, also a training corpus with `make-data`). The
held-out loss during training is `train.validation`, since it runs on the training mesh
(pipeline included).

Imports: config, parallel, model, data, formats, infer (never align or train).
"""
