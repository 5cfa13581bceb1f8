"""Pipeline parallelism against the one-device step, on fake CPU devices.

Like tests/test_parallel.py: one full training step (forward, backward, AdamW update)
on a pipelined mesh must give the loss and updated parameters of the one-device step.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_parallel import BASE, fixed_batch, trainer_on  # noqa: E402

from llama3_jax.config import ConfigError, MeshConfig, load_config, validate  # noqa: E402
from llama3_jax.model import loss_sum  # noqa: E402
from llama3_jax.parallel import sharding as shd  # noqa: E402
from llama3_jax.train import pipeline  # noqa: E402

DEEP = BASE + ["model.n_layers=8"]
AXES = ("dp", "fsdp", "pp", "cp", "tp")


def run_step(cfg, mesh_cfg, batch):
    """One training step on the mesh of `mesh_cfg`: (loss, params, state, compiled HLO text)."""
    trainer = trainer_on(cfg, mesh_cfg.sizes(), mesh_cfg)
    state = trainer.init_state()
    gbatch = trainer.put(batch)
    compiled = trainer.lower(state, gbatch).compile()  # compiled once: run it and keep its HLO
    state, metrics = compiled(state, gbatch)
    return float(metrics["loss"]), jax.device_get(state["params"]), state, compiled.as_text()


_STEPS = {}


def cached_step(mesh: dict, extra=()):
    """The step of one test case, shared by the tests that inspect it."""
    key = (tuple(sorted(mesh.items())), tuple(extra))
    if key not in _STEPS:
        cfg = load_config("debug-tiny", DEEP + list(extra))
        _STEPS[key] = run_step(cfg, MeshConfig(**mesh), fixed_batch())
    return _STEPS[key]


def assert_same_step(got, want):
    loss, params = got[:2]
    ref_loss, ref_params = want[:2]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(params) == set(ref_params)
    for name in ref_params:
        assert params[name].dtype == ref_params[name].dtype and params[name].shape == ref_params[name].shape
        np.testing.assert_allclose(params[name], ref_params[name], atol=1e-6, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def reference():
    """The one-device step (remat does not change the arithmetic, so one reference serves)."""
    cfg = load_config("debug-tiny", DEEP)
    ref = run_step(cfg, MeshConfig(), fixed_batch())
    # The step moves the parameters (first and last layer) by far more than the tolerance.
    init = jax.device_get(trainer_on(cfg, {}).init_state()["params"])
    assert np.abs(ref[1]["wq"][0] - init["wq"][0]).max() > 1e-4
    assert np.abs(ref[1]["w2"][-1] - init["w2"][-1]).max() > 1e-4
    return ref


TP_FSDP = dict(pp=2, tp=2, fsdp=2, pp_microbatches=4)
CASES = [
    (dict(pp=2, pp_microbatches=4), []),
    (dict(pp=4, pp_microbatches=8), ["model.remat=full"]),
    (dict(pp=2, pp_virtual_stages=2, pp_microbatches=4), []),  # interleaved
    (TP_FSDP, []),  # 8 devices, with TP and FSDP
    # Light ends: 8 layers over 5 stages as 1, 2, 2, 2, 1 (+ embedding / head and loss).
    (dict(pp=5, pp_microbatches=4, pp_light_ends=True), []),
]


@pytest.mark.parametrize("mesh,extra", CASES, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items())
                         if isinstance(v, dict) else "-".join(v))
def test_pipelined_step_equals_single_device_step(mesh, extra, reference):
    assert_same_step(cached_step(mesh, extra), reference)


def _paper16():
    """Runs in a subprocess with 16 fake devices: the paper's tp=cp=pp=dp=2 mesh."""
    cfg = load_config("debug-tiny", DEEP)
    loss, params = run_step(cfg, MeshConfig(dp=2, pp=2, cp=2, tp=2, pp_microbatches=4), fixed_batch())[:2]
    ref_loss, ref_params = run_step(cfg, MeshConfig(), fixed_batch())[:2]
    err = {k: float(np.abs(params[k] - ref_params[k]).max()) for k in ref_params}
    print(json.dumps({"loss": loss, "ref_loss": ref_loss, "err": err}))


@pytest.fixture(scope="module", autouse=True)
def paper16_process(request):
    """Started before the other tests so that it compiles while they run (when selected)."""
    if not any(item.name == "test_paper_16_device_mesh_in_subprocess" for item in request.session.items):
        yield None
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16", JAX_PLATFORMS="cpu")
    code = ("import jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
            "assert len(jax.devices()) == 16; import test_pipeline as t; t._paper16()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_paper_16_device_mesh_in_subprocess(paper16_process):
    out, err = paper16_process.communicate(timeout=600)
    assert paper16_process.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-5)
    for name, e in result["err"].items():
        assert e <= 1e-6, (name, e)


# ---------------------------------------------------------------- schedule and layout

@pytest.mark.parametrize("P,V,M", [(2, 1, 4), (4, 1, 2), (4, 1, 8), (2, 2, 4), (2, 2, 3), (4, 2, 2),
                                   (4, 3, 5), (3, 2, 1), (1, 2, 3)])
def test_schedule_runs_every_stage_once_in_dependency_order(P, V, M):
    plan = pipeline.Plan(pp=P, virtual=V, microbatches=M, n_layers=P * V)
    when = {}
    for t in range(plan.iterations):
        for p in range(P):
            pos = plan.position(t, p)
            if pos is not None:
                m, v = pos
                assert (m, v, p) not in when
                when[m, v, p] = t
    assert len(when) == M * V * P  # every micro-batch through every logical stage
    for (m, v, p), t in when.items():
        if p + 1 < P:  # handed to the next rank, which runs it the next iteration
            assert when[m, v, p + 1] == t + 1
        elif v + 1 < V:  # wrapped round to rank 0, held in its ring buffer
            assert when[m, v + 1, 0] - (t + 1) == plan.ring - 1
    assert plan.iterations == max(when.values()) + 1
    if M >= P or V == 1:
        assert plan.schedule_idle_fraction == pytest.approx(plan.bubble_fraction)
        assert plan.bubble_fraction == pytest.approx((P - 1) / (V * M))


def test_light_ends_layer_assignment():
    plan = pipeline.Plan(pp=2, virtual=2, microbatches=4, n_layers=10, light_ends=True)
    assert [len(s) for s in plan.stage_layers()] == [2, 3, 3, 2]
    assert sum(plan.stage_layers(), []) == list(range(10))
    index, pad = plan.layer_index()
    # Logical stage s = v*pp + p sits at [p, v]; the end stages' slot 0 is padding.
    assert pad.tolist() == [[True, False], [False, True]]
    assert index[0, 0, 1:].tolist() == [0, 1] and index[1, 1, 1:].tolist() == [8, 9]
    assert index[1, 0].tolist() == [2, 3, 4] and index[0, 1].tolist() == [5, 6, 7]
    # Llama 3 405B: 126 layers on pp=16 stages of 8 slots, the two ends with 7 layers.
    big = pipeline.Plan(pp=16, virtual=1, microbatches=16, n_layers=126, light_ends=True)
    assert [len(s) for s in big.stage_layers()] == [7] + [8] * 14 + [7]
    # Interleaved without light ends: rank 0 holds stages 0 and 2.
    plain = pipeline.Plan(pp=2, virtual=2, microbatches=4, n_layers=8)
    layers = {"w": jnp.arange(8)}
    np.testing.assert_array_equal(pipeline.to_stages(layers, plain)["w"], [[[0, 1], [4, 5]], [[2, 3], [6, 7]]])


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("mesh,overrides,message", [
    (dict(pp=4), ["model.n_layers=6"], "n_layers=6 is not divisible into pp\\*pp_virtual_stages=4\\*1=4"),
    (dict(pp=2, pp_virtual_stages=2), ["model.n_layers=6"], "4 stages"),
    (dict(pp=4, pp_light_ends=True), ["model.n_layers=8"], "plus the 2 lighter ends \\(10\\)"),
    (dict(pp=4, pp_light_ends=True), ["model.n_layers=2"], "without layers"),
    (dict(pp=2, pp_microbatches=3), ["model.n_layers=8"], "does not divide into mesh.pp_microbatches=3"),
    (dict(pp=2, dp=2, pp_microbatches=8), ["model.n_layers=8"], "does not divide over dp\\*fsdp=2"),
    (dict(pp=2, pp_light_ends=True), ["model.n_layers=6"], None),
    (dict(pp=4, pp_virtual_stages=2, pp_microbatches=2), ["model.n_layers=8"], None),
])
def test_pipeline_config_errors_are_clear(mesh, overrides, message):
    """Through config.validate, which runs the pipeline's checks for pp > 1."""
    cfg = load_config("debug-tiny", overrides)
    mesh_cfg = MeshConfig(**mesh)
    n = int(np.prod([mesh.get(a, 1) for a in AXES]))
    if message is None:
        validate(cfg, mesh_cfg, n)
        return
    with pytest.raises(ConfigError, match=message):
        validate(cfg, mesh_cfg, n)


@pytest.mark.parametrize("mesh,message", [
    (dict(pp=2, pp_microbatches=0), "pp_microbatches=0 must be at least 1"),
    (dict(pp=2, pp_virtual_stages=0), "pp_virtual_stages=0 must be at least 1"),
    (dict(pp=2, pp_virtual_stages=-1), "pp_virtual_stages=-1 must be at least 1"),
])
def test_pipeline_counts_must_be_positive(mesh, message):
    cfg = load_config("debug-tiny", ["model.n_layers=8"])
    mesh_cfg = MeshConfig(**mesh)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, mesh_cfg, mesh_cfg.fixed_device_count())


# ---------------------------------------------------------------- checkpoints, HLO, memory

def test_pipelined_state_has_the_mesh_independent_layout(tmp_path):
    from llama3_jax.formats import run
    cfg = load_config("debug-tiny", DEEP)
    _, params, state, _ = cached_step(CASES[0][0])
    abstract = trainer_on(cfg, {}).abstract_state()
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert state["params"]["wq"].shape[0] == 8  # [n_layers, ...], not [stages, ...]
    # Each pp rank stores only its block of layers (weights and Adam moments).
    wq, mu = state["params"]["wq"], state["opt_state"][1][0].mu["wq"]
    assert "pp" in str(wq.sharding.spec[0])
    assert wq.addressable_shards[0].data.shape[0] == 8 // CASES[0][0]["pp"]
    assert mu.sharding.spec == wq.sharding.spec
    mngr = run.manager(tmp_path, async_save=False)
    run.save(mngr, 1, state, {}, cfg, force=True)
    mngr.wait_until_finished()
    step, restored, _ = run.restore_latest(run.manager(tmp_path, read_only=True), abstract)
    assert step == 1
    for name in params:
        assert restored["params"][name].sharding.device_set == {jax.devices()[0]}
        np.testing.assert_array_equal(jax.device_get(restored["params"][name]), params[name])
    for got, want in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want))


def test_stage_transfer_is_a_collective_permute():
    hlo = cached_step(TP_FSDP)[3]
    permutes = [line for line in hlo.splitlines() if re.search(r"= \S+ collective-permute(-start)?\(", line)]
    assert permutes, "stage-to-stage transfer must be a collective-permute"
    # The transferred value is one micro-batch's activation: 2 rows x 64 positions x dim 64,
    # rows over fsdp=2 and positions over tp=2 (sequence parallel) -> f32[1,32,64] per device.
    # Mesh (fsdp, pp, tp) = (2, 2, 2): pp partners are devices 0<->2, 1<->3, 4<->6, 5<->7.
    acts = [line for line in permutes if "f32[1,32,64]" in line]
    assert acts, permutes
    assert any(all(pair in line for pair in ("{0,2}", "{1,3}", "{4,6}", "{5,7}")) for line in acts), acts


def test_bfloat16_compute_compiles_and_matches():
    """bfloat16 activations (the default compute dtype) through the pipeline with FSDP."""
    cfg = load_config("debug-tiny", DEEP + ["model.compute_dtype=bfloat16"])
    params = jax.device_get(trainer_on(cfg, {}).init_state()["params"])
    batch = {k: jnp.asarray(v) for k, v in fixed_batch().items()}
    want_loss, want = jax.jit(jax.value_and_grad(loss_sum), static_argnums=2)(params, batch, cfg.model)
    mesh = shd.make_mesh(fsdp=2, pp=2, devices=jax.devices()[:4])
    grad_fn = pipeline.make_grad_fn(cfg, mesh, MeshConfig(fsdp=2, pp=2, pp_virtual_stages=2, pp_microbatches=2))
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(grad_fn)(params, batch)
    assert float(loss) == pytest.approx(float(want_loss), rel=2e-3)
    for name, g in grads.items():
        assert g.dtype == want[name].dtype == jnp.float32
        a, b = np.ravel(g), np.ravel(want[name])
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99, name


@pytest.mark.parametrize("remat", ["full", "none"])
def test_loop_saves_activations_not_weights(remat):
    """Residuals stacked over the T loop iterations: stage inputs only with remat=full,
    more activations with remat=none, and never a copy of the stage weights."""
    cfg = load_config("debug-tiny", DEEP + [f"model.remat={remat}", "model.compute_dtype=bfloat16"])
    mesh = shd.make_mesh(pp=2, devices=jax.devices()[:2])
    grad_fn = pipeline.make_grad_fn(cfg, mesh, MeshConfig(pp=2, pp_microbatches=4))
    T = grad_fn.plan.iterations
    abstract = trainer_on(cfg, {}).abstract_state()["params"]
    params = {k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in abstract.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in fixed_batch().items()}
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(grad_fn)(params, batch))
    stacked = set(re.findall(rf"\b(?:f32|bf16)\[{T},[0-9,]*\]", text))
    # Weights would end in [..., 64, 192] (w1/w3), [..., 192, 64] (w2) or [..., 64, 4, 16] (wq)
    # without a micro-batch dim; activations have [.., 2 rows, 64 positions, ...].
    weights = {s for s in stacked if re.search(r",(64,192|192,64|64,4,16|64,2,16|4,16,64)\]$", s)
               and ",2,64," not in s}
    assert not weights, weights
    if remat == "full":
        assert stacked == {f"bf16[{T},2,64,64]"}
    else:
        assert f"bf16[{T},4,2,64,192]" in stacked  # the MLP activations of the stage's 4 layers


if __name__ == "__main__":
    _paper16()
