"""Compile time of the train step against depth: layers run as a scan, so it stays flat.

    python benchmarks/compile_time.py --config debug --layers 2 8 32 128
"""

import argparse
import os
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32, 128])
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from llama3_jax.config import load_config
    from llama3_jax.train.step import Trainer

    print(f"{'layers':>7}{'compile s':>11}{'HLO ops':>9}")
    for n in args.layers:
        trainer = Trainer(load_config(args.config, [f"model.n_layers={n}"]), devices=jax.devices()[:1])
        t0 = time.perf_counter()
        compiled = trainer.lower(trainer.abstract_state(), trainer.abstract_batch()).compile()
        seconds = time.perf_counter() - t0
        ops = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
        print(f"{n:>7}{seconds:>11.2f}{ops:>9}")


if __name__ == "__main__":
    main()
