"""Training: the optimizer and jitted step (`step.Trainer`, the one set-up of a run on a
mesh), the pipeline schedule over `pp`, metrics, and the loop that train.py runs.

Imports: everything below it (config, parallel, model, data, formats, infer).
"""
