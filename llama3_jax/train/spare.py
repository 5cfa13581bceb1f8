"""A warm spare for `train.py --max-restarts`: a training process started ahead of need.

While a run trains, the supervisor (`supervise`) starts the next process already: it imports
JAX, Flax, Optax, Orbax, Grain and the package (seconds of a restart's start-up) and lists
the default corpus's files if the run reads it, then blocks on a line from its stdin. It has
not touched the run directory and has not started JAX's backend (no devices, no accelerator
memory, XLA_FLAGS still free to set), so it costs the running child nothing but the CPU of
its imports, which run at a lower priority (nice 10) than the child's steps. When the child
stops for a cause a restart cures, the supervisor writes the release time and the spare
becomes the next session of the run at once: `loop.cli` with that time as the session's
start (goodput counts its start-up from there). End of input without a line (no restart
after all, or the supervisor died) ends the spare quietly.

    python -m llama3_jax.train.spare [train.py arguments]     (run by the supervisor only)
"""

from __future__ import annotations

import os
import sys
import threading
import time


def preload() -> None:
    """Import what a training session imports, without starting JAX's backend."""
    import grain  # noqa: F401
    import jax  # noqa: F401
    import jax.numpy  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import tqdm  # noqa: F401

    import llama3_jax.data  # noqa: F401
    import llama3_jax.data.schedule  # noqa: F401
    import llama3_jax.formats.run  # noqa: F401
    import llama3_jax.formats.weights  # noqa: F401
    import llama3_jax.infer.generate  # noqa: F401
    import llama3_jax.model  # noqa: F401
    import llama3_jax.train.context  # noqa: F401
    import llama3_jax.train.goodput  # noqa: F401
    import llama3_jax.train.loop  # noqa: F401
    import llama3_jax.train.metrics  # noqa: F401
    import llama3_jax.train.recovery  # noqa: F401
    import llama3_jax.train.step  # noqa: F401
    import llama3_jax.train.validation  # noqa: F401


def warm(argv: list[str]) -> None:
    """What a session computes from its arguments alone, before it reads the run directory:
    the default corpus's file list (a walk of the standard library)."""
    from llama3_jax.config import load_config
    from llama3_jax.train.loop import parse_args
    args = parse_args(argv)
    data = load_config(args.config, list(args.overrides)).data
    if not data.sources and not data.path:
        from llama3_jax.data.corpus import default_corpus_files
        default_corpus_files()


def wait_for_release(stream=None) -> float | None:
    """The release time the supervisor sends; None at end of input."""
    line = (stream or sys.stdin).readline().strip()
    try:
        return float(line) if line else None
    except ValueError:
        return time.time()


NICE = 10  # of the importing thread: the training process it shares the host with comes first


def prepare(argv: list[str]) -> None:
    """`preload` and `warm`, in a thread of lower priority (Linux: nice is per thread, so the
    session, which runs in the main thread, keeps its own)."""
    def work():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (OSError, AttributeError):
            pass
        try:
            preload()
            warm(argv)
        except (Exception, SystemExit):  # noqa: BLE001 - the session, if released, meets the same error and reports it
            pass
    thread = threading.Thread(target=work, name="llama3-spare-imports")
    thread.start()
    thread.join()


def main(argv: list[str]) -> int:
    prepare(argv)
    released = wait_for_release()
    if released is None:
        return 0
    devnull = os.open(os.devnull, os.O_RDONLY)  # the pipe is spent; a session reads no input
    os.dup2(devnull, 0)
    os.close(devnull)
    from llama3_jax.train.loop import cli
    return cli(argv, session_start=released)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
