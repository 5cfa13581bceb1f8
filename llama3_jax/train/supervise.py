"""`train.py --max-restarts N`: run the training in a child process and start it again
after a crash, a SIGKILL or a watchdog exit; each start resumes from the latest checkpoint.

Exits that a restart cannot cure end the run with the child's code: success (0), bad
configuration (2), a clean SIGTERM or Ctrl-C (143, 130), divergence and too much bad data.
Each restart is one line on stderr and one row of RUN/restarts.jsonl with its cause.
SIGTERM and Ctrl-C sent to the supervisor go to the child, which saves and exits.

A restart does not wait for imports: once a child is past its own start-up
(`SPARE_AFTER_S`), the supervisor starts a warm spare (`llama3_jax.train.spare`), the next
session with its imports done, blocked before it touches the run directory or starts JAX's
backend. A restart releases it at once; any other end of the run kills it unused.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

CHILD_ENV = "LLAMA3_JAX_SUPERVISED"
EXIT_HUNG = 75          # the watchdog stopped a hung step: restart
EXIT_DIVERGED = 76      # bad steps after train.max_rollbacks rollbacks: do not restart
EXIT_BAD_DATA = 77      # more bad rows than data.max_bad_row_fraction: do not restart
NO_RESTART = {0, 2, 130, 143, EXIT_DIVERGED, EXIT_BAD_DATA}
RESTARTED = "restart"   # CHILD_ENV of every session after the first


def restarted() -> bool:
    """This session is a restart (by `supervise`): the run's first session has already
    printed what a restart need not measure again (the data report)."""
    return os.environ.get(CHILD_ENV) == RESTARTED


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {EXIT_HUNG: "the watchdog stopped a hung step", EXIT_DIVERGED: "training diverged",
            EXIT_BAD_DATA: "too many bad data rows", 2: "a configuration error",
            130: "Ctrl-C", 143: "SIGTERM"}.get(code, f"exit code {code}")


# Seconds after a child starts when its spare does: the child's start-up (restore, first
# steps) is over by then, so the spare's imports do not slow it. LLAMA3_JAX_SPARE_AFTER_S
# overrides it (tests); "off" never starts one.
SPARE_AFTER_S = 20.0


def start_spare(argv: list[str], env: dict) -> subprocess.Popen:
    # Its own process group, like a child: a terminal's Ctrl-C never reaches a spare.
    return subprocess.Popen([sys.executable, "-m", "llama3_jax.train.spare", *argv], env=env,
                            stdin=subprocess.PIPE, process_group=0)


def release(spare: subprocess.Popen) -> bool:
    """Tell a spare to start its session now; False if it is gone."""
    try:
        spare.stdin.write(f"{time.time():.6f}\n".encode())
        spare.stdin.close()
    except OSError:
        return False
    return spare.poll() is None


def stop_spare(spare: subprocess.Popen | None) -> None:
    if spare is not None:  # blocked on its stdin or still importing: nothing of the run touched
        spare.kill()
        spare.wait()
        if not spare.stdin.closed:
            spare.stdin.close()


def supervise(argv: list[str], run_dir, max_restarts: int) -> int:
    run_dir = pathlib.Path(run_dir)
    cmd = [sys.executable, "-m", "llama3_jax.train.loop", *argv]
    env = dict(os.environ, **{CHILD_ENV: "1"})
    again = dict(os.environ, **{CHILD_ENV: RESTARTED})
    child = spare = None

    def forward(signum, _frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    restarts = 0
    after = os.environ.get("LLAMA3_JAX_SPARE_AFTER_S", str(SPARE_AFTER_S))
    spare_after = None if after == "off" else float(after)
    try:
        # Its own process group: a terminal's Ctrl-C reaches the child once, through forward().
        child = subprocess.Popen(cmd, env=env, process_group=0)
        while True:
            began = time.time()
            code = None
            if spare is None and restarts < max_restarts and spare_after is not None:
                try:
                    code = child.wait(timeout=spare_after)
                except subprocess.TimeoutExpired:
                    spare = start_spare(argv, again)
            if code is None:
                code = child.wait()
            if code in NO_RESTART:
                return code
            cause = describe(code)
            if restarts >= max_restarts:
                print(f"error: the run stopped ({cause}) and --max-restarts {max_restarts} is used up; "
                      "run the same command again to resume", file=sys.stderr)
                return code if code > 0 else 128 - code
            restarts += 1
            ran = time.time() - began
            warm = spare is not None and release(spare)
            if warm:
                child, spare = spare, None
            else:  # none yet (the child stopped early), or it died: a cold start
                stop_spare(spare)
                child, spare = subprocess.Popen(cmd, env=again, process_group=0), None
            print(f"restart {restarts}/{max_restarts}: {cause} after {ran:.1f} s; resuming from the latest "
                  f"checkpoint{' (in the warm spare)' if warm else ''}", file=sys.stderr, flush=True)
            if run_dir.is_dir():
                with open(run_dir / "restarts.jsonl", "a") as f:
                    f.write(json.dumps({"time": time.time(), "restart": restarts, "exit_code": code, "cause": cause,
                                        "ran_s": round(ran, 3), "warm_spare": warm, "pid": child.pid}) + "\n")
    finally:
        stop_spare(spare)
