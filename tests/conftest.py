import os
import pathlib
import tempfile

# Tests run on the host CPU with 8 fake devices unless a test starts its own subprocess.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Test workers share JAX's persistent compilation cache (train.py has it on by default too):
# the many Trainers of the same config compile each program once per CI run, not per test.
# It caches executables by their HLO, so every test still runs the program it builds.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "LLAMA3_JAX_TEST_XLA_CACHE", str(pathlib.Path(tempfile.gettempdir()) / f"llama3_jax-test-xla-{os.getuid()}")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


# Test files run whole on one worker (--dist loadfile), handed out in collection order: the
# longest go first, so that no long file starts last while the other worker sits idle.
LONGEST_FIRST = ["test_align", "test_parallel", "test_longctx", "test_pipeline", "test_train", "test_benchmarks",
                 "test_multihost", "test_curate", "test_eval", "test_recovery", "test_needle", "test_model",
                 "test_infer", "test_schedule", "test_convert", "test_install"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(pathlib.Path(str(item.fspath)).stem, len(rank)))
