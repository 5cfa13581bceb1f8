"""The benchmark scripts as a user runs them: honest figures, clear skips, the user's data."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_data_throughput_reads_the_users_sources(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " * 50}) + "\n" for i in range(200)))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'base = "debug-tiny"\n[[data.sources]]\npath = "{data}"\n')
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--config", str(cfg),
                        "--batches", "4", "--windows", "2", "--threads", "0", "--workers"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"# {data};" in p.stdout and "num_threads=0" in p.stdout


def test_pipeline_bubble_skips_what_the_stages_cannot_divide():
    # One pipelined configuration runs (test_pipeline proves them all equal to one device);
    # the one whose 8 stages cannot split 4 layers is reported as skipped, not dropped.
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline_bubble.py"), "--grid", "1/1/1,2/2/4,4/2/4",
                        "--layers", "4", "--steps", "1", "--dim", "64", "--seq", "64", "--batch", "8"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    skipped = [line for line in p.stdout.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "pp*pp_virtual_stages=4*2=8 stages" in skipped[0], p.stdout
    assert len([line for line in p.stdout.splitlines() if line[:2].strip().isdigit()]) == 3  # every row reported


def test_step_profile_shares_each_moment_among_the_ops_running_then():
    from step_profile import shares
    step = {"ph": "X", "name": "ThunkExecutor::Execute (wait for completion)", "ts": 100.0, "dur": 20e6}
    ops = [{"ph": "X", "name": "a", "ts": 100.0, "dur": 10e6}, {"ph": "X", "name": "b", "ts": 100.0 + 5e6, "dur": 10e6},
           {"ph": "X", "name": "c", "ts": 100.0 + 16e6, "dur": 1e6}, {"ph": "X", "name": "not an op", "ts": 100.0, "dur": 20e6}]
    seconds, per_kind, per_op = shares([step, *ops], {"a": "matmul", "b": "other", "c": "matmul"})
    # a runs alone for 5 s, then with b for 5 s, b alone 5 s; c alone 1 s; nothing for 4 s.
    assert seconds == 20 and per_op == {"a": 7.5, "b": 7.5, "c": 1.0}
    assert per_kind == {"matmul": 8.5, "other": 7.5, "idle": 4.0}


def test_step_profile_finds_the_matmuls_in_compiled_hlo():
    import jax
    import jax.numpy as jnp
    from step_profile import op_kinds
    a = jnp.ones((64, 32))
    hlo = jax.jit(lambda a: jnp.exp(a @ a.T) + 1).lower(a).compile().as_text()
    kinds = op_kinds(hlo)
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and set(kinds.values()) <= {"matmul", "transpose/copy", "other"}
    # Whatever the dot is fused into (or not), the entry instruction that runs it is a matmul.
    entry = hlo[hlo.index("ENTRY"):]
    ran = [n for n in kinds if f"%{n} = " in entry]
    assert any(kinds[n] == "matmul" for n in ran) and any(kinds[n] != "matmul" for n in kinds)


def test_the_prepared_gpu_checks_run_on_cpu_with_a_tiny_shape():
    """A lent GPU's minutes go to measuring, not to a script that broke since: both device
    scripts run end to end here, and the step table's tokens/s is batch x seq / step time."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--tiny", "--policies", "none", "full",
                        "--steps", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines() if line.split()[:1] in (["none"], ["full"])}
    assert set(rows) == {"none", "full"}, p.stdout
    for _, layers, _, _, seconds, tokens_per_s, _, mfu in rows.values():
        # The step time is printed to 3 decimals, tokens/s to whole tokens.
        low, high = 2 * 64 / (float(seconds) + 5e-4) - 0.5, 2 * 64 / (float(seconds) - 5e-4) + 0.5
        assert low <= float(tokens_per_s.replace(",", "")) <= high, (seconds, tokens_per_s)
        assert int(layers) == 32 and float(mfu.rstrip("%")) > 0
    assert p.stdout.splitlines()[-1].startswith("best: remat=")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_decode.py"), "--tiny"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(line.split()[:2] for line in p.stdout.splitlines() if line.startswith(("bf16", "int8"))) == \
        [["bf16", "1"], ["bf16", "8"], ["int8", "1"], ["int8", "8"]], p.stdout


def test_step_profile_without_the_executors_event_spans_first_to_last_op():
    from step_profile import shares
    ops = [{"ph": "X", "name": "a", "ts": 10.0, "dur": 2e6}, {"ph": "X", "name": "b", "ts": 10.0 + 3e6, "dur": 1e6}]
    seconds, per_kind, per_op = shares(ops, {"a": "matmul", "b": "other"})
    assert seconds == 4 and per_kind == {"matmul": 2.0, "other": 1.0, "idle": 1.0}
