"""Held-out loss during training: fixed batches of each held-out source, scored by a jitted
forward on the run's mesh (the pipeline's under pp). No optimizer state is read or written
and no random state is drawn, so a run's training is the same with evaluation on or off.

The batches come from `data.heldout_batches` (data.eval_sources, else data.eval_fraction of
each source; the default corpus holds out 2% of its files) and are rebuilt from the config
on every start, so a resumed run scores the same batches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.config import ConfigError
from llama3_jax.data import heldout_batches
from llama3_jax.model import loss_sum
from llama3_jax.parallel import sharding as shd


class Validation:
    """`validation(params) -> {"eval_loss", "eval_ppl", "eval_tokens", "eval_loss/<source>",
    "eval_ppl/<source>"}`: token-averaged next-token loss over the held-out batches."""

    def __init__(self, trainer, tokenizer, process_index: int = 0, process_count: int = 1):
        cfg, mesh = trainer.cfg, trainer.mesh
        self.trainer = trainer
        self.sets = heldout_batches(cfg.data, tokenizer, global_batch=cfg.train.global_batch,
                                    seq_len=cfg.data.seq_len, batches=cfg.train.eval_batches)
        if not self.sets:
            raise ConfigError("train.eval_every needs held-out documents: set data.eval_sources, or "
                              "data.eval_fraction > 0 for sources of more than one document")
        rows = cfg.train.global_batch // process_count
        self._rows = slice(process_index * rows, (process_index + 1) * rows)
        if mesh.shape["pp"] > 1:
            from llama3_jax.train import pipeline
            plan = pipeline.make_plan(cfg.model, trainer.mesh_cfg, mesh.shape["pp"])

            def total(params, batch):
                return pipeline.pipeline_loss(params, batch, cfg.model, mesh, plan)
        else:
            def total(params, batch):  # context parallelism reorders the tokens (Trainer.put)
                return loss_sum(params, batch, cfg.model, ordered=mesh.shape["cp"] == 1)

        def scored(params, batch):
            return total(params, batch), jnp.sum(batch["loss_mask"])

        shardings = {k: v for k, v in trainer.batch_shardings().items() if k in self.sets[0][1][0]}
        self._scored = jax.jit(scored, in_shardings=(jax.tree.map(lambda a: a.sharding,
                                                                  trainer.abstract_state()["params"]), shardings),
                               out_shardings=shd.replicated(mesh))

    def __call__(self, params) -> dict[str, float]:
        out, total_loss, total_count = {}, 0.0, 0.0
        with jax.set_mesh(self.trainer.mesh):
            for name, batches in self.sets:
                results = [self._scored(params, self.trainer.put({k: v[self._rows] for k, v in b.items()}))
                           for b in batches]
                sums = np.sum(np.asarray(jax.device_get(results), np.float64), axis=0)
                loss = sums[0] / max(sums[1], 1.0)
                out[f"eval_loss/{name}"], out[f"eval_ppl/{name}"] = loss, _ppl(loss)
                total_loss, total_count = total_loss + sums[0], total_count + sums[1]
        loss = total_loss / max(total_count, 1.0)
        return {"eval_loss": loss, "eval_ppl": _ppl(loss), "eval_tokens": total_count, **out}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # a diverged model's perplexity stays a finite number
