"""Pretrain Llama 3. With no arguments, trains a small model on this Python's standard library.

    llama3-train --config CONFIG --mesh MESH --steps N --out DIR [section.key=value ...]
    python train.py ...          (the same, from a checkout)
    python train.py --stage sft|rm|dpo|ppo ...   (post-training; see llama3_jax.align.stages)

Running the same command again with the same --out resumes from the latest checkpoint.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time

from llama3_jax.config import ConfigError, load_config, load_mesh
from llama3_jax.parallel import distributed
from llama3_jax.train import supervise


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="llama3-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug", help="preset name in configs/ or a .toml path")
    p.add_argument("--mesh", default=None, help="mesh name in meshes/ or a .toml path (default: one device)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides train.steps)")
    p.add_argument("--stage", default=None, help="pretrain (default), sft, rm, dpo or ppo (sets train.stage)")
    p.add_argument("--out", default="runs/default", help="run directory: metrics, checkpoints, plots")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--compile-only", action="store_true",
                   help="compile the train step ahead of time and report memory, FLOPs and time per device")
    p.add_argument("--topology", default=None, help="with --compile-only: a TPU topology, e.g. v5p:4x4x4 (libtpu)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the run after a crash or a hung step, up to N times (each resumes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    return p.parse_intermixed_args(argv)  # overrides may come before or after options


def main(argv=None, session_start: float | None = None) -> int:
    """`session_start`: when this session (the next context stage, in the same process) began."""
    args = parse_args(argv)
    if args.max_restarts and not os.environ.get(supervise.CHILD_ENV):
        if args.max_restarts < 0 or args.compile_only:
            raise ConfigError("--max-restarts needs a count of 1 or more, and a training run (not --compile-only)")
        return supervise.supervise(sys.argv[1:] if argv is None else list(argv), args.out, args.max_restarts)
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else []) + \
        ([f"train.stage={args.stage}"] if args.stage else [])
    cfg, mesh_cfg = load_config(args.config, overrides), load_mesh(args.mesh)
    plan_cfg, plan_mesh = cfg, mesh_cfg  # the whole run; cfg and mesh_cfg become its current context stage
    if args.topology and not args.compile_only:
        raise ConfigError("--topology describes hardware to compile for: add --compile-only")
    # Fake CPU devices must be requested before JAX starts; real accelerators ignore this.
    processes = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if not args.topology:
        distributed.fake_cpu_devices((mesh_cfg.fixed_device_count() or 1) // processes)
    if not args.compile_only:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from llama3_jax.train import context

    import logging

    import jax
    from llama3_jax.formats.bpe import default_cache_dir
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notes about optional metadata files
    # A restart (or the next run of the same shapes) loads the compiled step from disk.
    cache = cfg.train.compile_cache or str(default_cache_dir() / "xla")
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from tqdm import tqdm

    from llama3_jax.data import ShardedBatches, check_bad_rows
    from llama3_jax.data.schedule import describe_schedule, make_batches, mix_read
    from llama3_jax.formats import run as run_dir
    from llama3_jax.formats.weights import check_same_model, load_params, open_source
    from llama3_jax.infer.generate import Sampling, allowed_ids, completion, generate
    from llama3_jax.model import flops_per_token, param_count
    from llama3_jax.train.metrics import MetricsWriter, peak_flops, plot_loss, read_metrics
    from llama3_jax.train import recovery
    from llama3_jax.train.goodput import Goodput, format_summary
    from llama3_jax.train.step import Trainer, param_shardings
    from llama3_jax.train.validation import Validation

    if args.compile_only:  # every context stage, one after the other
        from llama3_jax.train import plan
        devices = plan.topology_devices(args.topology) if args.topology else None
        context.check(cfg, mesh_cfg, len(devices or jax.devices()))
        for k in range(len(cfg.train.context_stages) + 1):
            if cfg.train.context_stages:
                print(context.describe(plan_cfg, plan_mesh, k))
            print("\n".join(plan.report(plan.plan(*context.apply(plan_cfg, plan_mesh, k), devices))))
        return 0

    is_main = jax.process_index() == 0
    stop = recovery.StopSignals(coordinated=jax.process_count() > 1)  # SIGTERM and Ctrl-C now save first
    log = print if is_main else (lambda *a, **k: None)
    out = pathlib.Path(args.out)
    tc = cfg.train

    # --- validate everything before compiling or touching the run directory
    recovery.check_out_dir(out)
    context.check(plan_cfg, plan_mesh, jax.device_count(), jax.process_count())
    latest = context.latest_step(out)
    stage = context.stage_of(plan_cfg, latest or 0)
    cfg, mesh_cfg = context.apply(plan_cfg, plan_mesh, stage)
    tc, end = cfg.train, context.stage_end(plan_cfg, stage)  # this session trains up to step `end`
    if plan_cfg.train.context_stages:
        log(context.describe(plan_cfg, plan_mesh, stage))
    post = tc.stage != "pretrain"
    if post:
        from llama3_jax.align import stages
        cfg = stages.configure(cfg, out)
        trainer = Trainer(cfg, mesh_cfg, objective=stages.objective(cfg), batch_axes=stages.batch_axes(cfg))
    else:
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
    # The weights a run starts from (a reward model's new value head keeps its initialisation).
    init_shardings = {k: v for k, v in param_shardings(cfg.model, trainer.mesh).items()
                      if init_source is None or k != "value_head" or init_source.model.value_head}
    if init_source is not None:
        check_same_model(init_source, dataclasses.replace(cfg.model, value_head=init_source.model.value_head),
                         f"train.init_from={tc.init_from}")
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if tc.stage == "ppo":
        batches = stages.rollouts(cfg, tok, trainer.mesh, log=log)
    elif post:
        make, _ = stages.batches(cfg, tok, **where, log=log)
        batches = ShardedBatches(cfg.data, tok, global_batch=tc.global_batch, seq_len=cfg.data.seq_len,
                                 make=make, **where)
    else:
        # Batches prepared 8 ahead: the row shuffle's next window is read while they are used.
        batches = make_batches(cfg.data, tok, global_batch=tc.global_batch, seq_len=cfg.data.seq_len, steps=tc.steps,
                               window_cache=out / "data_windows", prefetch=8, **where)
        for line in describe_schedule(batches, tok, cfg) if not supervise.restarted() else ():  # told once
            log(line)
    validation = Validation(trainer, tok, **where) if tc.eval_every and not post else None
    benchmark = None
    if tc.benchmark_every and not post:
        from llama3_jax.eval.cli import require_lm_eval
        require_lm_eval()
        from llama3_jax.eval.harness import Benchmark
        benchmark = Benchmark(cfg, tok, trainer.mesh, out)
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "tokenizer.model"
    if not cfg.data.tokenizer and not kept.exists() and is_main:
        shutil.copyfile(tok.path, kept)

    # --- state: resume from the latest checkpoint, else initialise (optionally from weights)
    mngr = run_dir.manager(out, keep=tc.keep_checkpoints, save_every=tc.checkpoint_every)
    saved_cfg = run_dir.latest_config(mngr)
    if saved_cfg is not None:  # before anything in the run directory is written: as the saved stage trained
        saved_stage = context.stage_of(plan_cfg, max(latest - 1, 0))
        expected = cfg if saved_stage == stage else context.apply(plan_cfg, plan_mesh, saved_stage)[0]
        recovery.check_resume(saved_cfg, expected, out, log)
    if not post:
        trainer.compile_ahead()  # while the state and the data position are restored
    goodput = Goodput(out, enabled=is_main, session_start=session_start)
    stream = recovery.BatchStream(batches, recovery.parse_ranges(tc.skip_batches))
    initial_data = stream.local_state()
    t = time.perf_counter()
    restored = run_dir.restore_latest(mngr, trainer.abstract_state(), log=log)
    if restored:
        start, state, data_state = restored
        fresh = None  # a rollback that reloads finds a checkpoint
        if context.stage_of(plan_cfg, start) != stage:  # a newer checkpoint was unreadable: plan again
            return NEXT_STAGE
        if context.stage_of(plan_cfg, max(start - 1, 0)) == stage:
            stream.restore(data_state)
        else:  # the first step of a new context stage: its own stream, the batch count and skips go on
            stream.restore(data_state, iterator=False)
    restore_s = time.perf_counter() - t  # the state and the data position
    goodput.event("restore", restore_s)
    if restored:
        recovery.resume_notes(run_dir.read_config(out, start)[0].train, tc, start, log)
        log(f"resumed {out} at step {start}")
    else:
        start, init_params = 0, None
        if init_source is not None:
            init_params = load_params(init_source, init_shardings, cfg.model.param_dtype)
            log(f"initialised weights from {tc.init_from}")
        state = trainer.init_state(params=init_params)

        def start_over():  # a rollback that reloads, with no checkpoint yet, starts the run again
            stream.restore(initial_data)
            return trainer.init_state(params=init_source and load_params(
                init_source, init_shardings, cfg.model.param_dtype))
        fresh = start_over

    extend, ref_params = (lambda batch: batch), None  # noqa: E731
    if tc.stage in ("dpo", "ppo"):  # the frozen reference: the SFT weights, else this run's own initial weights
        ref = stages.check_reference(cfg)
        ref_params = load_params(open_source(ref), init_shardings, cfg.model.param_dtype) if ref else \
            trainer.init_state()["params"]
        log(f"reference: {ref or 'the initial weights of this run'}")
    if tc.stage == "dpo":
        extend = stages.Reference(ref_params, cfg, trainer.mesh, trainer.batch_shardings()["ref_logps"])
    elif tc.stage == "ppo":  # rollouts sample from the parameters as they stand when a rollout is due
        batches.reference, batches.policy = ref_params, lambda: state["params"]

    tokens_per_step = tc.global_batch * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(jax.devices()[0], tc.peak_flops_per_device)
    log(f"model {args.config}: {param_count(cfg.model) / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOP/token; "
        f"mesh {trainer.sizes} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    writer = MetricsWriter(out, resume_step=start, enabled=is_main)
    bar = tqdm(total=tc.steps, initial=start, disable=not is_main, dynamic_ncols=True)
    faults = recovery.Faults(out, cfg.model.vocab_size)
    watchdog = recovery.Watchdog(out / "watchdog" / f"stacks-{jax.process_index()}.txt",
                                 on_fire=lambda waited: goodput.event("watchdog", waited))
    goodput.event("startup", time.time() - goodput.start - restore_s)
    bad = []  # (step, batch index) of the current run of consecutive bad steps
    relabeled = set()  # steps an in-place rollback freed again (their rows so far: bad steps)
    host = {"data": 0.0, "save": 0.0}  # host seconds since the last result, by what they waited on

    def device_waited(running) -> bool:
        """Whether host work just done kept the devices waiting: nothing was running (`running`:
        the last dispatched step's metrics, or None), or that step had already finished."""
        return running is None or all(x.is_ready() for x in jax.tree.leaves(running))

    def draw(at, running=None):
        """The batch of 0-based step `at`; its time is lost (data wait) if the devices waited."""
        t = time.perf_counter()
        if hasattr(batches, "select"):  # the data schedule (annealing); PPO's rollouts have none
            batches.select(at)
        index, batch = next(stream)
        batch = extend(trainer.put(faults.batch(index, batch)))
        if device_waited(running):
            host["data"] += time.perf_counter() - t
        return index, batch

    def finish(step, metrics, index, dt, first, bad_rows) -> bool:
        """Record a step's result; True when its bad run calls for a rollback."""
        m = jax.device_get(metrics)
        reason = recovery.REASONS[int(m["skipped"])]
        tps = tokens_per_step / dt
        tflops = flops_tok * tps / jax.device_count() / 1e12
        row = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
               "tokens": context.tokens_at(plan_cfg, step), "step_time_s": dt, "tokens_per_s": tps,
               "tflops_per_device": tflops,
               "mfu": tflops * 1e12 / peak if peak else None, "batch": index, "skipped": reason is not None,
               "bad_rows": bad_rows[2]}
        row.update({k: float(v) for k, v in m.items() if k not in row and k not in ("skipped", "tokens")})
        if tc.stage == "ppo":
            row.update(batches.stats_of(index))
        if reason:
            row["skip_reason"] = reason
        row = writer.write(row)
        # A step whose earlier row was a bad step that an in-place rollback took back is no redo.
        redo = row.get("redo", False) and step not in relabeled
        relabeled.discard(step)
        goodput.step(step, dt - host["data"] - host["save"], skipped=reason is not None, first=first, redo=redo)
        for kind in host:
            goodput.event(kind, host[kind])
            host[kind] = 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}")
        if reason is None:
            bad.clear()
            return False
        bad.append((step, index))
        bar.write(f"step {step}: {reason} loss {row['loss']:.4g} on batch {index}; no update applied")
        return bool(tc.rollback_after) and len(bad) >= tc.rollback_after

    def evaluate(step, params) -> float:
        """Held-out loss and benchmarks when due (every process takes part; process 0 writes);
        the seconds they took once the step's parameters were ready."""
        due = [v for v, every in ((validation, tc.eval_every), (benchmark, tc.benchmark_every))
               if v is not None and (step % every == 0 or step == end)]
        if not due:
            return 0.0
        jax.block_until_ready(params)  # the step's own time stays the step's
        t = time.perf_counter()
        watchdog.arm(tc.compile_timeout_s, f"evaluation at step {step}")  # benchmarks can take long
        if validation in due:
            row = writer.write({"step": step, "event": "eval", **validation(params)})
            bar.write(f"step {step}: eval loss {row['eval_loss']:.4f}, perplexity {row['eval_ppl']:.2f}")
        if benchmark in due:
            writer.write({"step": step, "event": "benchmark", **benchmark(params, step, log=bar.write)})
        watchdog.arm(tc.step_timeout_s, f"step {step + 1}")
        goodput.event("eval", time.perf_counter() - t)
        return time.perf_counter() - t

    def rollback(state, in_place: bool):
        """Skip the bad run's batches from now on, and go back to the state before it: the
        state in memory (`in_place`: the bad steps applied no update, so it is that state), or
        the newest checkpoint from before the run. Returns (step, state)."""
        (first_step, first_batch), (last_step, last_batch) = bad[0], bad[-1]
        window = (first_batch, last_batch)
        stream.rollbacks += 1
        where = f"steps {first_step}-{last_step} on batches {first_batch}-{last_batch}"
        if stream.rollbacks > tc.max_rollbacks:
            raise recovery.Diverged(f"{len(bad)} bad steps in a row at {where}, after {tc.max_rollbacks} rollback(s) "
                                    f"(train.max_rollbacks); the run stopped at step {last_step}, data position "
                                    f"batch {last_batch + 1}: lower train.lr or raise train.max_rollbacks")
        mngr.wait_until_finished()
        earlier = [s for s in mngr.all_steps() if s < first_step]
        if in_place:
            back, how = first_step - 1, "the state in memory (the bad steps applied no update)"
        elif earlier:
            back, state, data = run_dir.restore_step(mngr, max(earlier), trainer.abstract_state())
            stream.restore(data)
            how = "its checkpoint"
        elif fresh is not None:
            back, state, how = 0, fresh(), "the initial state"
        else:
            raise recovery.Diverged(f"bad steps at {where}, and no checkpoint before step {first_step} to roll back "
                                    "to; raise train.keep_checkpoints or lower train.checkpoint_every")
        for later in [s for s in mngr.all_steps() if s > back]:
            log(run_dir.set_aside(mngr, later, "abandoned by a rollback"))
        stream.skips = recovery.merge(stream.skips, [window])
        bad.clear()
        log(f"rollback {stream.rollbacks}/{tc.max_rollbacks}: {where}; back to step {back} from {how}, skipping "
            f"batches {window[0]}-{window[1]} (train.skip_batches of this run: {recovery.format_ranges(stream.skips)})")
        writer.write({"step": back, "event": "rollback", "skip_batches": f"{window[0]}-{window[1]}",
                      "bad_steps": f"{first_step}-{last_step}", "rollbacks": stream.rollbacks})
        relabeled.update(range(first_step, last_step + 1))
        return back, state

    # The host never waits on the step it has just dispatched: while step k runs it puts
    # batch k+1 on the devices and then fetches step k-1's results. A step's time is the
    # time between two steps' results (the session's first includes compiling). A bad
    # step applies no update on the device; the host learns of it one step later.
    step, pending, first, local_data, to_save = start, None, True, None, None
    ready = time.perf_counter()  # the first step's time includes drawing its batch (counted as data)
    cur = draw(step) if step < end else None
    stop.agree(start)  # JAX's step count starts at 0: a SIGTERM before the first step must agree past `start`
    watchdog.arm(tc.compile_timeout_s, f"step {step + 1} (compiling)")
    try:
        while True:
            dispatched = None
            if step < end and not stop:
                index, batch = cur
                state, metrics = trainer(state, batch)
                step += 1
                dispatched = (step, metrics, index)
                stop.agree(step)
                faults.after_dispatch(step)
                local_data = stream.local_state()
                cur = draw(step, metrics) if step < end else None
            if to_save is not None:  # a copy of the last step's state, saved while this step runs
                t = time.perf_counter()
                run_dir.save(mngr, *to_save, cfg)
                if device_waited(dispatched and dispatched[1]):
                    host["save"] += time.perf_counter() - t
                to_save = None
            if pending is not None:
                jax.block_until_ready(pending[1])
                now = time.perf_counter()
                bad_rows = batches.bad_rows()
                redo = finish(*pending, now - ready, first, bad_rows)
                ready, first = now, False
                watchdog.arm(tc.step_timeout_s, f"step {step}")
                if redo:
                    # The step in flight started from the state before the bad run, on the batch
                    # after it: in place, it is the next step. Only a data-schedule switch among
                    # the draws since then (they chose their mix by step) needs the checkpoint.
                    in_place = not (hasattr(batches, "switch") and bad[0][0] - 1 < batches.switch <= step + 1)
                    if dispatched is not None and not in_place:
                        jax.block_until_ready(dispatched[1])  # from the abandoned trajectory
                    t = time.perf_counter()
                    watchdog.arm(tc.compile_timeout_s, "rollback")
                    step, state = rollback(state, in_place)
                    goodput.event("restore", time.perf_counter() - t)
                    if not in_place or dispatched is None:  # nothing in flight to keep
                        ready, pending = time.perf_counter(), None
                        if not in_place:  # the data position went back with the checkpoint
                            local_data, cur = None, draw(step)
                        elif cur is None:  # else the batch after the window is drawn already
                            cur = draw(step)
                        continue
                    step += 1
                    dispatched = (step, *dispatched[1:])
                data_error = check_bad_rows(*bad_rows, cfg.data)
                if data_error:
                    stop.data_error(data_error)
            pending = dispatched
            if pending is None:
                break
            ready += evaluate(step, state["params"])  # evaluation time is no step's time
            if mngr.should_save(step) and tc.checkpoint_copy:  # saved once the next step is on its way
                to_save = (step, trainer.copy(state), stream.checkpoint_state(local_data))
            elif mngr.should_save(step):
                jax.block_until_ready(state)  # Orbax copies the state off the device before it returns
                t = time.perf_counter()
                run_dir.save(mngr, step, state, stream.checkpoint_state(local_data), cfg)
                host["save"] += time.perf_counter() - t
    except recovery.Diverged as e:
        mngr.wait_until_finished()
        watchdog.disarm()
        bar.close()
        writer.close()
        goodput.finish()
        print(f"error: training diverged: {e}", file=sys.stderr)
        return recovery.EXIT_DIVERGED
    bar.close()
    watchdog.arm(tc.compile_timeout_s, "the final checkpoint")
    t = time.perf_counter()
    if local_data is not None and step not in mngr.all_steps():
        run_dir.save(mngr, step, state, stream.checkpoint_state(local_data), cfg, force=True)
    mngr.wait_until_finished()
    watchdog.disarm()
    goodput.event("save", time.perf_counter() - t)
    if local_data is not None and not post:  # the mix as read (a collective: every process takes part)
        mix = mix_read(batches, batches.gather_state(local_data["iterator"]))
        if is_main:
            (out / "data_mix.json").write_text(json.dumps({"step": step, "sources": mix}, indent=1) + "\n")
        log("data mix read: " + ", ".join(f"{r['name']} {r['share']:.1%}" for r in mix))
    writer.close()
    summary = goodput.finish()
    if end < tc.steps and step == end and not stop:
        log(f"context stage {stage + 1} done at step {step}; the next one starts from its checkpoint")
        return NEXT_STAGE
    if stop:
        line = stop.exit_line(f"step {step} in {run_dir.checkpoint_dir(out)}")
        if stop.message:
            print(line, file=sys.stderr)
        else:
            log(line)
        return stop.exit_code
    for line in format_summary(summary):
        log(line)
    final_eval = [r for r in read_metrics(out) if r.get("event") == "eval" and r["step"] == step] if is_main else []
    if final_eval:
        log(f"eval perplexity at step {step}: {final_eval[-1]['eval_ppl']:.2f} (loss {final_eval[-1]['eval_loss']:.4f} "
            f"on {final_eval[-1]['eval_tokens']:,.0f} held-out tokens)")

    if post and stages.on_task(cfg, out):  # the stage's effect on the task (SPMD: every process takes part)
        results = stages.evaluate(state["params"], cfg, tok, trainer.mesh,
                                  reference=ref_params if tc.stage == "dpo" else None)
        writer = MetricsWriter(out, resume_step=step, enabled=is_main)
        writer.write({"step": step, "event": "evaluation", **results})
        writer.close()
        for name, value in results.items():
            log(f"{name}: {value:.3f}")
    if post:
        if is_main:
            print(f"\nmetrics:     {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out})")
            print(f"checkpoints: {run_dir.checkpoint_dir(out)} (steps {sorted(mngr.all_steps())})")
            print(f"loss curve:  {plot_loss(out)}")
        return 0
    # Sampling is SPMD over the mesh, so every process takes part; process 0 prints.
    prompt = tok.encode(tc.sample_prompt, bos=True)
    stops = sorted(tok.stop_ids)
    ids = generate(state["params"], cfg.model, [prompt], Sampling(tc.sample_tokens, temperature=0.8, seed=tc.seed),
                   stop_ids=stops, allowed=allowed_ids(cfg.model.vocab_size, tok, stops), mesh=trainer.mesh).tokens[0]
    if is_main:
        png = plot_loss(out)
        print(f"\nmetrics:     {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out})")
        print(f"checkpoints: {run_dir.checkpoint_dir(out)} (steps {sorted(mngr.all_steps())})")
        print(f"loss curve:  {png}")
        print(f"sample:      {tc.sample_prompt + completion(tok, ids)!r}")
    return 0


NEXT_STAGE = -1  # main's answer when a context stage is done and the next one starts


def cli(argv=None, session_start: float | None = None) -> int:
    """Entry point of `llama3-train` and train.py: bad input is one `error:` line, exit 2.
    `session_start`: when this session began, if not when its process did (a warm spare)."""
    try:
        code = main(argv, session_start=session_start)
        while code == NEXT_STAGE:
            code = main(argv, session_start=time.time())
        return code
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
