#!/usr/bin/env bash
# The prepared GPU check: one call on a lent H100/H200, well inside 8 minutes. A bf16 train
# step of llama3-8b-shaped layers with cuDNN attention and the best remat policy; prints
# tokens/s, TFLOP/s and MFU against the card's bf16 peak (see benchmarks/gpu_step.py).
#
#   bash benchmarks/gpu.sh           on the GPU machine (its image has JAX with CUDA)
#   bash benchmarks/gpu.sh --tiny    the same path on CPU with a tiny shape
#
# The GPU image has JAX 0.11.2, flax, optax, orbax and tensorstore; the step needs nothing
# else of ours installed (grain and tensorboardX are imported only by the training loop).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
"$python" - <<'PY'
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "tensorstore", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)}; carry them as wheels (see .library/device/README.md)")
import jax
print(f"# JAX {jax.__version__} on {jax.devices()}")
PY
exec "$python" benchmarks/gpu_step.py "$@"
