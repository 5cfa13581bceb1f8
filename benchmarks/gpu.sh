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
# JAX takes 75% of GPU memory by default; the layer count is sized to 90% of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
python="${PYTHON:-python3}"
# Flax NNX as this project uses it (>= 0.12): if the image's is older, install a carried
# wheel (.whl/flax-*.whl; see .library/device/README.md) into /tmp/site.
if ! "$python" -c 'import flax, sys; sys.exit(tuple(map(int, flax.__version__.split(".")[:2])) < (0, 12))' 2>/dev/null \
    && ls .whl/flax-*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/flax-*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$python" - <<'PY'
import importlib.util, sys
def found(module):  # find_spec of a submodule raises when its parent package is missing
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "tensorstore", "numpy") if not found(m)]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)}; carry them as wheels (see .library/device/README.md)")
import jax
import flax
print(f"# JAX {jax.__version__}, Flax {flax.__version__} on {jax.devices()}")
PY
exec "$python" benchmarks/gpu_step.py "$@"
