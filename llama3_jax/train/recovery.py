"""Bad steps and what a run does about them: the in-step guard (non-finite or spiking loss
applies no update, decided on the device), the batches a run skips (data rollback), the
watchdog for hung steps, and the fault-injection hooks that prove them.

Fault injection is for tests and benchmarks, off unless LLAMA3_JAX_FAULTS is set, a
comma-separated list of:
    nan@B       batch index B yields a NaN loss (every time it is trained on)
    spike@B     batch index B yields a loss spike (every target an id no text uses)
    kill@S      the process SIGKILLs itself after dispatching step S (once per run directory)
    hang@S      step S never finishes on the host (once per run directory)
B and S may be ranges "a-b". One-shot faults leave a marker in RUN/faults/ so a restarted
run does not meet them again; faults tied to a batch recur, as bad data would.
"""

from __future__ import annotations

import faulthandler
import math
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.config import ConfigError, TrainConfig
from llama3_jax.train.supervise import EXIT_BAD_DATA, EXIT_DIVERGED, EXIT_HUNG

REASONS = {0: None, 1: "non-finite", 2: "spike"}


# ---------------------------------------------------------------- configuration

def parse_ranges(text: str, key: str = "train.skip_batches") -> tuple[tuple[int, int], ...]:
    """"a-b,c" (inclusive, 0-based) as sorted (a, b) ranges."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if sep else lo)
        except ValueError:
            a, b = -1, -1
        if a < 0 or b < a:
            raise ConfigError(f"{key}: {part!r} is not a range of indices; write e.g. \"120-135,400\" "
                              "(inclusive, from 0)")
        ranges.append((a, b))
    return tuple(sorted(ranges))


def format_ranges(ranges) -> str:
    return ",".join(f"{a}-{b}" for a, b in sorted(ranges))


def check(t: TrainConfig) -> None:
    parse_ranges(t.skip_batches)
    for key in ("spike_warmup", "rollback_after", "max_rollbacks"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be 0 or more, got {getattr(t, key)}")
    if t.spike_window < 1:
        raise ConfigError(f"train.spike_window must be at least 1, got {t.spike_window}")
    if not (math.isfinite(t.spike_k) and t.spike_k >= 0):
        raise ConfigError(f"train.spike_k must be 0 (off) or positive, got {t.spike_k}")
    if t.step_timeout_s < 0 or t.compile_timeout_s < 0:
        raise ConfigError("train.step_timeout_s and train.compile_timeout_s must be 0 (off) or positive")


# What may change when a run resumes: how long it runs and how it saves, logs, guards and
# computes, not what it computes. Every other key must match the checkpoint's (new keys are
# therefore safe by default). The mesh is not in the config: any mesh resumes. data.shards
# is checked by the data iterator, which knows the process count.
RESUMABLE = {f"train.{k}" for k in (
    "steps", "checkpoint_every", "keep_checkpoints", "checkpoint_copy", "sample_tokens", "sample_prompt",
    "compile_cache", "peak_flops_per_device", "step_timeout_s", "compile_timeout_s", "spike_k", "spike_window",
    "spike_warmup", "rollback_after", "max_rollbacks", "skip_batches", "init_from", "micro_batches",
    "context_stages")} | {
    "model.remat", "model.attention_impl", "model.loss_chunk", "data.shards", "data.max_bad_row_fraction"}


def _flat(cfg) -> dict:
    from llama3_jax.config import to_dict
    return {f"{section}.{k}": v for section, values in to_dict(cfg).items() for k, v in values.items()}


def check_resume(saved, cfg, run_dir, log=print) -> None:
    """A clear error, before anything is restored or written, when the run directory's
    checkpoint was trained with settings that change what the run computes; one line for
    each allowed change (train.steps is told by the loop)."""
    old, new = _flat(saved), _flat(cfg)
    changed = sorted(k for k in new if old.get(k, new[k]) != new[k])
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        what = "; ".join(f"{k}: saved {old[k]!r}, now {new[k]!r}" for k in refused)
        raise ConfigError(f"{run_dir} was trained with other settings ({what}); resume with the saved settings, "
                          f"or start a new --out (train.init_from={run_dir} takes its weights)")
    for k in changed:
        if k != "train.steps":
            log(f"note: {k} changed from {old[k]!r} to {new[k]!r} on resume")


# ---------------------------------------------------------------- the in-step guard

def init_guard() -> dict:
    """Running loss statistics over good steps (part of the train state, so checkpointed)."""
    return {"loss_mean": jnp.zeros((), jnp.float32), "loss_var": jnp.zeros((), jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32)}


def judge(loss, grad_norm, guard: dict, tc: TrainConfig):
    """(ok, reason code, new guard): 1 = non-finite loss or gradient, 2 = loss spike."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    mean, var, n = guard["loss_mean"], guard["loss_var"], guard["good_steps"]
    spike = jnp.asarray(False)
    if tc.spike_k > 0:
        spike = (n >= max(tc.spike_warmup, 1)) & (loss > mean + tc.spike_k * jnp.sqrt(var))
    ok = finite & ~spike
    # An exponential moving mean and variance with an effective window of spike_window steps;
    # the first good step starts them. Bad steps leave them alone.
    alpha = jnp.where(n == 0, 1.0, 2.0 / (tc.spike_window + 1))
    delta = loss - mean
    new = {"loss_mean": mean + alpha * delta, "loss_var": (1 - alpha) * (var + alpha * delta * delta),
           "good_steps": n + 1}
    new = keep_if(ok, new, guard)
    reason = jnp.where(finite, jnp.where(spike, 2, 0), 1).astype(jnp.int32)
    return ok, reason, new


def keep_if(ok, new_tree, old_tree):
    """new_tree where ok, else old_tree, leaf by leaf (no host round trip)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_tree, old_tree)


# ---------------------------------------------------------------- resuming

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


# ---------------------------------------------------------------- skipped batches

def is_skipped(index: int, ranges) -> bool:
    return any(a <= index <= b for a, b in ranges)


def merge(ranges, new) -> tuple[tuple[int, int], ...]:
    """Union of range lists, adjacent or overlapping ranges joined."""
    out = []
    for a, b in sorted(tuple(ranges) + tuple(new)):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


class BatchStream:
    """The run's batches with their 0-based index in the data stream, the skipped ranges
    (train.skip_batches and every rollback's window) drawn and dropped, so a batch's index
    never depends on what was skipped before it."""

    def __init__(self, batches, skips=()):
        self.batches, self.skips = batches, tuple(skips)
        self.index, self.rollbacks = 0, 0

    def __next__(self) -> tuple[int, dict]:
        while is_skipped(self.index, self.skips):
            next(self.batches)
            self.index += 1
        self.index += 1
        return self.index - 1, next(self.batches)

    def local_state(self) -> dict:
        """This process's position, taken right after a draw (cheap: no collective)."""
        return {"iterator": self.batches.get_state(), "next_batch": self.index,
                "skip_batches": format_ranges(self.skips), "rollbacks": self.rollbacks}

    def checkpoint_state(self, local: dict) -> dict:
        """`local` with every process's iterator (a collective: all processes call it)."""
        return dict(local, iterator=self.batches.gather_state(local["iterator"]))

    def restore(self, saved: dict, iterator: bool = True) -> None:
        """Continue from a checkpoint's position, keeping the skips and rollbacks known now;
        without `iterator`, the batches are a new stream (a context stage's) that goes on
        from the checkpoint's batch count."""
        if "iterator" not in saved:  # a checkpoint from before data rollback: the iterator only
            self.batches.set_state(saved)
            return
        if iterator:
            self.batches.set_state(saved["iterator"])
        self.index = saved["next_batch"]
        self.skips = merge(self.skips, parse_ranges(saved.get("skip_batches", "")))
        self.rollbacks = max(self.rollbacks, saved.get("rollbacks", 0))


# ---------------------------------------------------------------- signals

class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) finish the current step, save and exit with 128 + the
    signal (143, 130); a second Ctrl-C exits at once without saving.

    With several processes (`coordinated`), the processes must stop at the same step:
    SIGTERM is left to JAX's preemption notifier, a Ctrl-C or a data error here sends this
    process a SIGTERM, and the loop stops once `multihost_utils.reached_preemption_sync_point`
    says every process has agreed on the step (`agree`)."""

    def __init__(self, coordinated: bool = False):
        self.coordinated, self.agreed = coordinated, False
        self.signum, self.message, self._code = None, None, None
        signal.signal(signal.SIGINT, self._handle)
        if not coordinated:  # installing it would replace JAX's notifier
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, _frame) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if self.signum is not None and signum == signal.SIGINT:
            print(f"\n{name} again: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        if self.signum is None:
            self.signum = signum
            print(f"\n{name}: finishing this step, then saving a checkpoint"
                  + (" (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
            self._ask_others()

    def data_error(self, message: str) -> None:
        """Stop as for a signal, for too many bad rows: save, one line, EXIT_BAD_DATA."""
        if self.message is None and self.signum is None:
            self.message, self._code = message, EXIT_BAD_DATA
            self._ask_others()

    def _ask_others(self) -> None:
        if self.coordinated:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which tells every process

    def agree(self, step: int) -> None:
        """Coordinated runs: call after dispatching each step, on every process."""
        if self.coordinated and not self.agreed:
            from jax.experimental import multihost_utils
            self.agreed = multihost_utils.reached_preemption_sync_point(step)

    def __bool__(self) -> bool:
        if self.coordinated:
            return self.agreed
        return self.signum is not None or self._code is not None

    def exit_line(self, where: str) -> str:
        if self.message:
            return f"error: {self.message}; saved checkpoint at {where}"
        name = "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"
        return f"{name}: saved checkpoint at {where}; exiting"

    @property
    def exit_code(self) -> int:
        return self._code or 128 + int(self.signum or signal.SIGTERM)


class Diverged(Exception):
    """Bad steps that rollbacks did not cure (EXIT_DIVERGED)."""


# ---------------------------------------------------------------- watchdog

class Watchdog:
    """A thread that, when the armed deadline passes, writes every thread's stack to
    `dump_path` and exits the process with EXIT_HUNG: a hung step or collective can never
    hang the run forever. `arm(seconds)` at each step, `disarm()` around waits that are not
    steps."""

    def __init__(self, dump_path: pathlib.Path, on_fire=None):
        self.dump_path, self.on_fire = pathlib.Path(dump_path), on_fire  # on_fire(seconds waited)
        self._deadline, self._what, self._armed = None, "", time.monotonic()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="llama3-watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        with self._lock:
            self._armed = time.monotonic()
            self._deadline = self._armed + seconds if seconds > 0 else None
            self._what = what

    def disarm(self) -> None:
        self.arm(0, "")

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                fired = self._deadline is not None and time.monotonic() > self._deadline
                what, waited = self._what, time.monotonic() - self._armed
            if fired:
                self.dump_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.dump_path, "a") as f:
                    f.write(f"--- watchdog {time.strftime('%Y-%m-%d %H:%M:%S')}: {what} did not finish\n")
                    faulthandler.dump_traceback(file=f, all_threads=True)
                print(f"\nwatchdog: {what} did not finish in time; thread stacks in {self.dump_path}; "
                      f"exiting with {EXIT_HUNG}", file=sys.stderr, flush=True)
                if self.on_fire is not None:
                    self.on_fire(waited)
                os._exit(EXIT_HUNG)


# ---------------------------------------------------------------- fault injection

class Faults:
    """The LLAMA3_JAX_FAULTS hooks of one run (see the module docstring); inert when unset."""

    def __init__(self, run_dir, vocab_size: int, spec: str | None = None):
        self.vocab_size = vocab_size
        spec = os.environ.get("LLAMA3_JAX_FAULTS", "") if spec is None else spec
        self.marks = pathlib.Path(run_dir) / "faults"
        self.kinds: dict[str, tuple] = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, _, where = item.partition("@")
            if kind not in ("nan", "spike", "kill", "hang"):
                raise ConfigError(f"LLAMA3_JAX_FAULTS: unknown fault {item!r}; use nan@B, spike@B, kill@S, hang@S")
            self.kinds[kind] = merge(self.kinds.get(kind, ()), parse_ranges(where, "LLAMA3_JAX_FAULTS"))

    def batch(self, index: int, batch: dict) -> dict:
        """The host batch as fault injection leaves it."""
        if is_skipped(index, self.kinds.get("nan", ())):
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        if is_skipped(index, self.kinds.get("spike", ())):
            # Every target the last id, which no text uses: once the model has learned anything,
            # a loss far above its running mean.
            batch = dict(batch, targets=np.full_like(batch["targets"], self.vocab_size - 1))
        return batch

    def _once(self, kind: str, step: int) -> bool:
        if not is_skipped(step, self.kinds.get(kind, ())):
            return False
        mark = self.marks / f"{kind}@{step}"
        if mark.exists():
            return False
        self.marks.mkdir(parents=True, exist_ok=True)
        mark.touch()
        return True

    def after_dispatch(self, step: int) -> None:
        if self._once("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._once("hang", step):
            while True:
                time.sleep(1)
