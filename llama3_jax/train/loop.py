"""Pretrain Llama 3. With no arguments, trains a small model on this Python's standard library.

    llama3-train --config CONFIG --mesh MESH --steps N --out DIR [section.key=value ...]
    python train.py ...          (the same, from a checkout)

Running the same command again with the same --out resumes from the latest checkpoint.
"""

import argparse
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time

from llama3_jax.config import ConfigError, load_config, load_mesh
from llama3_jax.parallel import distributed


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="llama3-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug", help="preset name in configs/ or a .toml path")
    p.add_argument("--mesh", default=None, help="mesh name in meshes/ or a .toml path (default: one device)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides train.steps)")
    p.add_argument("--out", default="runs/default", help="run directory: metrics, checkpoints, plots")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--compile-only", action="store_true",
                   help="compile the train step ahead of time and report memory, FLOPs and time per device")
    p.add_argument("--topology", default=None, help="with --compile-only: a TPU topology, e.g. v5p:4x4x4 (libtpu)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    return p.parse_args(argv)


def check_out_dir(out: pathlib.Path) -> None:
    """A clear error, before anything is compiled or created, when --out cannot be a run
    directory: a file, a path through a file, or a place this process cannot write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (new, or an earlier run to resume)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out} runs through {parent}, which is a file; give a directory")
    try:  # the only sure test of writability (read-only mounts, root, quotas): write something
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".llama3-jax-write-test-"))
    except OSError as e:
        raise ConfigError(f"--out {out} is not writable ({parent}: {e.strerror}); choose a directory you can "
                          "write") from None


def resume_notes(saved_train, tc, start: int, log) -> None:
    """One line for each change of train.steps on resume that alters what the run does."""
    from llama3_jax.train.step import lr_schedule
    if tc.steps < start:
        raise ConfigError(f"--steps {tc.steps} is below the run's step {start}, so there is nothing to train; "
                          f"give --steps above {start} to train further (checkpoints are kept)")
    if tc.steps == start:
        log(f"the run is already at step {start} = --steps; nothing to train (give more --steps to continue)")
    elif saved_train.steps != tc.steps:
        was, now = float(lr_schedule(saved_train)(start)), float(lr_schedule(tc)(start))
        log(f"note: train.steps changed from {saved_train.steps} to {tc.steps}: the cosine schedule now decays "
            f"over {tc.steps} steps, so the learning rate at step {start} moves from {was:.3g} to {now:.3g}")


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg, mesh_cfg = load_config(args.config, overrides), load_mesh(args.mesh)
    if args.topology and not args.compile_only:
        raise ConfigError("--topology describes hardware to compile for: add --compile-only")
    # Fake CPU devices must be requested before JAX starts; real accelerators ignore this.
    processes = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if not args.topology:
        distributed.fake_cpu_devices((mesh_cfg.fixed_device_count() or 1) // processes)
    if not args.compile_only:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import jax
    from llama3_jax.formats.bpe import default_cache_dir
    # A restart (or the next run of the same shapes) loads the compiled step from disk.
    cache = cfg.train.compile_cache or str(default_cache_dir() / "xla")
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from tqdm import tqdm

    from llama3_jax.data import ShardedBatches
    from llama3_jax.data.report import describe_sources, format_report
    from llama3_jax.formats import run as run_dir
    from llama3_jax.formats.weights import check_same_model, load_params, open_source
    from llama3_jax.infer.sample import sample
    from llama3_jax.model import flops_per_token, param_count
    from llama3_jax.train.metrics import MetricsWriter, peak_flops, plot_loss
    from llama3_jax.train.step import Trainer, param_shardings

    if args.compile_only:
        from llama3_jax.train import plan
        devices = plan.topology_devices(args.topology) if args.topology else None
        print("\n".join(plan.report(plan.plan(cfg, mesh_cfg, devices))))
        return 0

    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    out = pathlib.Path(args.out)
    tc = cfg.train

    # --- validate everything before compiling or touching the run directory
    check_out_dir(out)
    trainer = Trainer(cfg, mesh_cfg)
    # The default BPE depends on this Python's stdlib, so a run keeps its own copy and
    # resumes (or exports) with it on any machine.
    tok = run_dir.run_tokenizer(cfg, out)
    if tok is None:
        raise ConfigError(f"{out} holds a converted checkpoint without a tokenizer; set data.tokenizer")
    if tok.n_words > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.n_words} ids but model.vocab_size={cfg.model.vocab_size}; "
                          f"set model.vocab_size={tok.n_words} or use a matching tokenizer")
    init_source = open_source(tc.init_from) if tc.init_from else None
    if init_source is not None:
        check_same_model(init_source, cfg.model, f"train.init_from={tc.init_from}")
    batches = ShardedBatches(cfg.data, tok, global_batch=tc.global_batch, seq_len=cfg.data.seq_len,
                             process_index=jax.process_index(), process_count=jax.process_count())
    run_tokens = tc.steps * tc.global_batch * cfg.data.seq_len
    for line in format_report(describe_sources(batches.sources, tok, run_tokens=run_tokens)):
        log(line)
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "tokenizer.model"
    if not cfg.data.tokenizer and not kept.exists() and is_main:
        shutil.copyfile(tok.path, kept)

    # --- state: resume from the latest checkpoint, else initialise (optionally from weights)
    mngr = run_dir.manager(out, keep=tc.keep_checkpoints, save_every=tc.checkpoint_every)
    restored = run_dir.restore_latest(mngr, trainer.abstract_state(), log=log)
    if restored:
        start, state, data_state = restored
        batches.set_state(data_state)
        resume_notes(run_dir.read_config(out, start)[0].train, tc, start, log)
        log(f"resumed {out} at step {start}")
    else:
        start, init_params = 0, None
        if init_source is not None:
            init_params = load_params(init_source, param_shardings(cfg.model, trainer.mesh), cfg.model.param_dtype)
            log(f"initialised weights from {tc.init_from}")
        state = trainer.init_state(params=init_params)

    # --- preemption: SIGTERM finishes the current step, saves, and exits
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    tokens_per_step = tc.global_batch * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(jax.devices()[0], tc.peak_flops_per_device)
    log(f"model {args.config}: {param_count(cfg.model) / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOP/token; "
        f"mesh {trainer.sizes} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    writer = MetricsWriter(out, resume_step=start, enabled=is_main)
    bar = tqdm(total=tc.steps, initial=start, disable=not is_main, dynamic_ncols=True)

    def record(step, metrics, dt):
        m = jax.device_get(metrics)
        tps = tokens_per_step / dt
        tflops = flops_tok * tps / jax.device_count() / 1e12
        writer.write({"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                      "lr": float(m["lr"]), "tokens": step * tokens_per_step, "step_time_s": dt,
                      "tokens_per_s": tps, "tflops_per_device": tflops,
                      "mfu": tflops * 1e12 / peak if peak else None})
        bar.update(1)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tps:,.0f}")

    # The host never waits on the step it has just dispatched: while step k runs it puts
    # batch k+1 on the devices and then fetches step k-1's metrics. A step's time is the
    # time between two steps' results (the first one's includes compiling).
    step, pending, ready = start, None, time.perf_counter()
    data_state = batches.get_state()  # the data position after `step` steps, for checkpoints
    batch = trainer.put(next(batches)) if step < tc.steps else None
    while step < tc.steps and not stop:
        state, metrics = trainer(state, batch)
        step += 1
        data_state = batches.get_state()
        if step < tc.steps:
            batch = trainer.put(next(batches))
        if pending is not None:
            jax.block_until_ready(pending[1])
            now = time.perf_counter()
            record(*pending, now - ready)
            ready = now
        pending = (step, metrics)
        if mngr.should_save(step):
            run_dir.save(mngr, step, state, batches.gather_state(data_state), cfg)
    if pending is not None:
        jax.block_until_ready(pending[1])
        record(*pending, time.perf_counter() - ready)
    bar.close()
    if step not in mngr.all_steps():
        run_dir.save(mngr, step, state, batches.gather_state(data_state), cfg, force=True)
    mngr.wait_until_finished()
    writer.close()
    if stop:
        log(f"SIGTERM: saved checkpoint at step {step} in {run_dir.checkpoint_dir(out)}; exiting")
        return 143

    # Sampling is SPMD over the mesh, so every process takes part; process 0 prints.
    prompt = tok.encode(tc.sample_prompt, bos=True)
    with jax.set_mesh(trainer.mesh):
        ids = sample(state["params"], cfg.model, prompt, tc.sample_tokens, seed=tc.seed, stop_ids=(tok.eos_id,))
    if is_main:
        png = plot_loss(out)
        print(f"\nmetrics:     {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out})")
        print(f"checkpoints: {run_dir.checkpoint_dir(out)} (steps {sorted(mngr.all_steps())})")
        print(f"loss curve:  {png}")
        print(f"sample:      {tc.sample_prompt + tok.decode(ids)!r}")
    return 0


def cli(argv=None) -> int:
    """Entry point of `llama3-train` and train.py: bad input is one `error:` line, exit 2."""
    try:
        return main(argv)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
