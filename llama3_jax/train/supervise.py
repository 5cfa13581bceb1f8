"""`train.py --max-restarts N`: run the training in a child process and start it again
after a crash, a SIGKILL or a watchdog exit; each start resumes from the latest checkpoint.

Exits that a restart cannot cure end the run with the child's code: success (0), bad
configuration (2), a clean SIGTERM or Ctrl-C (143, 130), divergence and too much bad data.
Each restart is one line on stderr and one row of RUN/restarts.jsonl with its cause.
SIGTERM and Ctrl-C sent to the supervisor go to the child, which saves and exits.
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


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {EXIT_HUNG: "the watchdog stopped a hung step", EXIT_DIVERGED: "training diverged",
            EXIT_BAD_DATA: "too many bad data rows", 2: "a configuration error",
            130: "Ctrl-C", 143: "SIGTERM"}.get(code, f"exit code {code}")


def supervise(argv: list[str], run_dir, max_restarts: int) -> int:
    run_dir = pathlib.Path(run_dir)
    cmd = [sys.executable, "-m", "llama3_jax.train.loop", *argv]
    env = dict(os.environ, **{CHILD_ENV: "1"})
    child = None

    def forward(signum, _frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    restarts = 0
    while True:
        began = time.time()
        # Its own process group: a terminal's Ctrl-C reaches the child once, through forward().
        child = subprocess.Popen(cmd, env=env, process_group=0)
        code = child.wait()
        if code in NO_RESTART:
            return code
        cause = describe(code)
        if restarts >= max_restarts:
            print(f"error: the run stopped ({cause}) and --max-restarts {max_restarts} is used up; "
                  "run the same command again to resume", file=sys.stderr)
            return code if code > 0 else 128 - code
        restarts += 1
        print(f"restart {restarts}/{max_restarts}: {cause} after {time.time() - began:.1f} s; "
              "resuming from the latest checkpoint", file=sys.stderr, flush=True)
        if run_dir.is_dir():
            with open(run_dir / "restarts.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), "restart": restarts, "exit_code": code, "cause": cause,
                                    "ran_s": round(time.time() - began, 3)}) + "\n")
