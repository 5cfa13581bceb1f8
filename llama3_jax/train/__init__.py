"""Training: the optimizer and jitted step (`step.Trainer`, the one set-up of a run on a
mesh), the pipeline schedule over `pp`, metrics, the loop that train.py runs, and what
keeps a long run alive: bad-step guard, rollback, watchdog and fault hooks (`recovery`),
the restart supervisor (`supervise`) with its warm spare (`spare`) and goodput accounting
(`goodput`); the held-out loss during training (`validation`).

Imports: everything below it (config, parallel, model, data, formats, infer, align, eval).
"""
