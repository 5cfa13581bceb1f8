"""Sharded training steps against the one-device step, on 8 fake CPU devices."""

import re

import jax
import numpy as np
import pytest

from llama3_jax.config import ConfigError, MeshConfig, load_config, validate
from llama3_jax.parallel import sharding as shd
from llama3_jax.train.step import Trainer

# A large Adam eps keeps the update smooth in the gradient, so float reordering across
# devices (1e-7 relative) cannot flip near-zero gradients into lr-sized updates.
BASE = ["model.tie_embeddings=false", "train.global_batch=8", "train.warmup_steps=0",
        "train.lr=1e-2", "train.eps=1e-3", "model.compute_dtype=float32"]


def fixed_batch(batch=8, seq=64, vocab=2048, packed=True, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    seg = np.ones((batch, seq), np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    if packed:  # three documents per row, cut at different places
        for r in range(batch):
            a, b = sorted(rng.choice(np.arange(5, seq - 5), 2, replace=False))
            seg[r, a:], seg[r, b:] = 2, 3
            pos[r, a:b], pos[r, b:] = np.arange(b - a), np.arange(seq - b)
    loss_mask = np.ones((batch, seq), np.float32)
    loss_mask[:, :-1] = seg[:, 1:] == seg[:, :-1]
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], segment_ids=seg, positions=pos, loss_mask=loss_mask)


def trainer_on(cfg, sizes, mesh_cfg=None):
    """The Trainer of `cfg` on the first devices, as many as the mesh `sizes` need."""
    n = int(np.prod(list(sizes.values()))) if sizes else 1
    return Trainer(cfg, mesh_cfg or MeshConfig(**sizes), devices=jax.devices()[:n])


def one_step(cfg, sizes, batch, mesh_cfg=None):
    trainer = trainer_on(cfg, sizes, mesh_cfg)
    state, metrics = trainer(trainer.init_state(), trainer.put(batch))
    return float(metrics["loss"]), jax.device_get(state["params"]), state


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(cfg, batch_key, batch):
        """(loss, params after the step, params before it) on one device."""
        if batch_key not in cache:
            trainer = trainer_on(cfg, {})
            init = trainer.init_state()
            before = jax.device_get(init["params"])
            state, metrics = trainer(init, trainer.put(batch))
            cache[batch_key] = float(metrics["loss"]), jax.device_get(state["params"]), before
        return cache[batch_key]
    return get


# TP and CP alone at size 4, and the combinations (DP, FSDP, TP and CP at size 2); FSDP over 8 devices is
# checked by its collectives below.
MESHES = [
    (dict(tp=4), ["model.n_kv_heads=2"]),  # more TP ranks than KV heads: the KV heads are replicated
    (dict(cp=4), []),
    (dict(dp=2, fsdp=2, tp=2), []),
    (dict(fsdp=2, cp=2, tp=2), []),
]


@pytest.mark.parametrize("sizes,extra", MESHES, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_sharded_step_equals_single_device_step(sizes, extra, reference):
    cfg = load_config("debug-tiny", BASE + extra)
    batch = fixed_batch()
    ref_loss, ref_params, init = reference(cfg, tuple(extra), batch)
    loss, params, _ = one_step(cfg, sizes, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in ref_params:
        np.testing.assert_allclose(params[name], ref_params[name], atol=1e-6, rtol=0, err_msg=name)
    # The update moved the parameters by far more than the tolerance.
    assert np.abs(ref_params["wq"] - init["wq"]).max() > 1e-4


def test_state_is_sharded_as_the_rules_say():
    cfg = load_config("debug-tiny", BASE + ["model.n_kv_heads=2"])
    state = trainer_on(cfg, dict(fsdp=4, tp=2)).init_state()
    p = state["params"]
    P = jax.sharding.PartitionSpec
    assert p["wq"].sharding.spec == P(None, "fsdp", "tp", None)
    assert p["wk"].sharding.spec == P(None, "fsdp", "tp", None)
    assert p["wo"].sharding.spec == P(None, "tp", None, "fsdp")
    assert p["w1"].sharding.spec == P(None, "fsdp", "tp")
    assert p["w2"].sharding.spec == P(None, "tp", "fsdp")
    assert p["embed"].sharding.spec == P("tp", "fsdp")
    assert p["output"].sharding.spec == P("fsdp", "tp")
    assert p["attention_norm"].sharding.spec == P(None, None)
    # Adam moments follow their parameters; per-device bytes shrink by fsdp*tp = 8.
    mu = state["opt_state"][1][0].mu
    for name in ("wq", "w1", "embed"):
        assert mu[name].sharding.spec == p[name].sharding.spec
        shard = p[name].addressable_shards[0].data
        assert shard.nbytes * 8 == p[name].nbytes
        assert mu[name].addressable_shards[0].data.nbytes * 8 == mu[name].nbytes


def test_kv_heads_replicate_when_tp_exceeds_them():
    cfg = load_config("debug-tiny", BASE + ["model.n_kv_heads=2"])
    p = trainer_on(cfg, dict(tp=4)).init_state()["params"]
    assert p["wk"].sharding.spec == jax.sharding.PartitionSpec(None, None, None, None)
    assert p["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp", None)


def test_paper_16_device_groups():
    devices = [jax.devices()[0]] * 0 + list(range(16))  # ids stand in for devices
    mesh_devices = np.asarray(devices).reshape(2, 1, 2, 2, 2)  # dp, fsdp, pp, cp, tp
    # make_mesh lays devices out row-major in exactly this order
    mesh = shd.make_mesh(dp=2, pp=2, cp=2, tp=2, devices=[_FakeDevice(i) for i in range(16)])
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids, mesh_devices)

    def group(axis, of=0):
        idx = list(zip(*np.nonzero(ids == of)))[0]
        ax = shd.MESH_AXES.index(axis)
        sl = list(idx)
        sl[ax] = slice(None)
        return sorted(ids[tuple(sl)].ravel().tolist())
    assert group("tp") == [0, 1] and group("cp") == [0, 2] and group("pp") == [0, 4] and group("dp") == [0, 8]


class _FakeDevice:
    def __init__(self, i):
        self.id = i


def test_cp_order_balances_chunks():
    order = shd.cp_order(16, 2)  # 4 chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])


def compiled_text(cfg, sizes):
    trainer = trainer_on(cfg, sizes)
    return trainer.lower(trainer.abstract_state(), trainer.abstract_batch()).compile().as_text()


def test_context_parallel_gathers_kv_not_logits():
    cfg = load_config("debug-tiny", BASE)
    hlo = compiled_text(cfg, dict(cp=2))
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
    assert gathers, "CP must all-gather K and V"
    # K/V gathers have kv_heads=2, head_dim=16 trailing dims; nothing vocab-sized is gathered.
    assert any("2,16]" in line for line in gathers)
    assert not any("2048]" in line for line in gathers)


def test_tensor_parallel_never_gathers_full_logits():
    cfg = load_config("debug-tiny", BASE)
    hlo = compiled_text(cfg, dict(tp=2))
    for line in hlo.splitlines():
        if ("all-gather" in line or "all-to-all" in line) and "=" in line:
            assert "2048]" not in line.split("=")[1].split("(")[0] or "f32[2048]" in line, line


@pytest.mark.parametrize("sizes,overrides,message", [
    (dict(fsdp=3), [], "needs 3 devices"),
    (dict(tp=8), ["model.n_heads=4"], "n_heads=4 is not divisible by mesh tp=8"),
    (dict(tp=2), ["model.n_kv_heads=1", "model.n_heads=2"], None),  # kv 1 < tp 2 replicates: fine
    (dict(cp=8), ["data.seq_len=72"], "divisible by 2*cp=16"),
    (dict(tp=8), ["model.n_heads=8", "model.n_kv_heads=8", "data.seq_len=60"], "cp*tp=8"),
    (dict(dp=2, fsdp=4), ["train.global_batch=4"], "does not divide over dp*fsdp=8"),
    (dict(), ["train.global_batch=6", "train.micro_batches=4"], "does not divide into"),
    (dict(), ["data.seq_len=1024"], "exceeds model.max_seq_len"),
])
def test_mesh_errors_are_clear_before_compiling(sizes, overrides, message):
    cfg = load_config("debug-tiny", overrides)
    mesh_cfg = MeshConfig(**sizes)
    n_devices = 8 if message and "devices" in message else int(np.prod(list(sizes.values())))
    if message is None:
        validate(cfg, mesh_cfg, n_devices)
        return
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        validate(cfg, mesh_cfg, n_devices)


def test_mesh_minus_one_takes_remaining_devices():
    mesh = shd.make_mesh(fsdp=-1, tp=2)
    assert dict(mesh.shape) == dict(dp=1, fsdp=4, pp=1, cp=1, tp=2)
    assert mesh.axis_names == ("dp", "fsdp", "pp", "cp", "tp")


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    from llama3_jax.formats import run
    cfg = load_config("debug-tiny", BASE)
    batch = fixed_batch()
    _, _, state = one_step(cfg, dict(fsdp=8), batch)
    saved = jax.device_get(state)
    mngr = run.manager(tmp_path, async_save=False)
    run.save(mngr, 1, state, {"0": {}}, cfg)
    mngr.wait_until_finished()

    losses = []
    for sizes in (dict(tp=2, fsdp=4), dict()):
        trainer = trainer_on(cfg, sizes)
        step, restored, data_state = run.restore_latest(mngr, trainer.abstract_state())
        assert step == 1 and data_state == {"0": {}}
        want = trainer.abstract_state()
        for k in restored["params"]:
            assert restored["params"][k].sharding == want["params"][k].sharding
            np.testing.assert_array_equal(np.asarray(restored["params"][k]), saved["params"][k])
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["opt_state"]), saved["opt_state"])
        # Training continues identically on the new mesh.
        _, m = trainer(restored, trainer.put(fixed_batch(seed=1)))
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_gradient_accumulation_equals_one_large_batch(reference):
    cfg = load_config("debug-tiny", BASE)
    batch = fixed_batch()
    ref_loss, ref_params, _ = reference(cfg, (), batch)
    loss, params, _ = one_step(load_config("debug-tiny", BASE + ["train.micro_batches=4"]), {}, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref_params:
        np.testing.assert_allclose(params[name], ref_params[name], atol=1e-6, rtol=0, err_msg=name)


def test_replicated_parameter_dimensions_are_logged_once(caplog):
    """fsdp=3 cannot split dim 64, so every parameter's embed dimension stays whole: each
    such dimension is named once, however often shardings are computed."""
    cfg = load_config("debug-tiny", BASE + ["train.global_batch=6"])
    with caplog.at_level("WARNING", logger="llama3_jax.parallel.sharding"):
        p = trainer_on(cfg, dict(fsdp=3)).init_state()["params"]
        trainer_on(cfg, dict(fsdp=3))
    assert p["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, None, None)
    lines = [r.getMessage() for r in caplog.records]
    want = "parameter wq: dimension 1 (embed, size 64) is not divisible by mesh axis fsdp=3"
    assert sum(want in line for line in lines) == 1, lines
    assert len(lines) == len(set(lines)) and any(line.startswith("parameter output:") for line in lines)


def collectives(hlo: str):
    """(kind, output shapes, computation) of every collective in compiled HLO text."""
    out, computation = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        m = re.search(r"= (.+?) (all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)(?:-start)?\(",
                      line)
        if m:
            shapes = tuple(s.split("{")[0] for s in re.findall(r"[fsbu]\d+\[[\d,]*\]", m.group(1)))
            out.append((m.group(2), shapes, computation))
    return out


def test_fsdp_gathers_one_layer_at_a_time_and_tp_never_gathers_weights():
    """FSDP gathers each layer's weights inside the layer loops (forward and backward),
    never all layers' stacked weights at once; the global ones (the output head) once.
    Tensor parallelism never gathers a weight: only activations and token ids move."""
    from llama3_jax.model import LAYER_PARAMS, param_shapes
    cfg = load_config("debug-tiny", BASE)
    shapes = {n: "f32[" + ",".join(map(str, s)) + "]" for n, s in param_shapes(cfg.model).items()}
    layer = {n: "f32[" + ",".join(map(str, param_shapes(cfg.model)[n][1:])) + "]" for n in LAYER_PARAMS}
    gathers = [(shape, where) for kind, out, where in collectives(compiled_text(cfg, dict(fsdp=8)))
               if kind == "all-gather" for shape in out]
    assert not [g for g in gathers if g[0] in shapes.values() and g[0] not in (shapes["output"], shapes["embed"])]
    in_loops = sorted(shape for shape, where in gathers if where != "ENTRY")
    # wq, wk, wv, wo, w1, w3, w2 of one layer, gathered by the forward loop and again by the backward one.
    want = [layer[n] for n in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")]
    assert in_loops == sorted(want * 2), in_loops
    assert ("f32[64,2048]", "ENTRY") in gathers  # the output head: gathered whole once, as FSDP does
    tp = [shape for kind, out, _ in collectives(compiled_text(cfg, dict(tp=2))) if kind == "all-gather"
          for shape in out]
    assert tp and not set(tp) & (set(shapes.values()) | set(layer.values())), tp
    # Sequence-parallel activations ([b, s, dim], or [dim, b, s] where the backward pass
    # gathers the transposed hidden states for a weight gradient) and token ids.
    assert set(tp) <= {"f32[8,64,64]", "f32[64,8,64]", "s32[8,64,1]"}, tp
