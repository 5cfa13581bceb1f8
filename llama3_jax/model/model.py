"""The Llama 3 model in Flax NNX: the whole network in one file.

Layer parameters are stacked along a leading `layers` axis and the blocks run as one
`jax.lax.scan`, so compile time does not grow with depth. Parameters keep Meta's names
and Meta's rotary layout (q/k features rotate in adjacent pairs); the Hugging Face layout
is converted in `llama3_jax.formats.hf`. Every parameter carries logical axis names
(`axes` metadata) and the main activations are annotated with `constrain`; which mesh
axes those names map to is decided by the rule table in `llama3_jax.parallel.sharding`,
never here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama3_jax.config import ModelConfig, dtype_of
from llama3_jax.model.attention import attention
from llama3_jax.parallel.sharding import constrain

# Logical axis names of every parameter, by name. Layer parameters lead with "layers".
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "attention_norm": ("layers", "embed_norm"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "ffn_norm": ("layers", "embed_norm"),
    "w1": ("layers", "embed", "mlp"),
    "w3": ("layers", "embed", "mlp"),
    "w2": ("layers", "mlp", "embed"),
    "norm": ("embed_norm",),
    "output": ("embed", "vocab"),
    "value_head": ("embed_norm",),
}
LAYER_PARAMS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, d, h, kv, hd, f, V = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                             cfg.ffn_dim, cfg.vocab_size)
    shapes = {
        "embed": (V, d),
        "attention_norm": (L, d), "wq": (L, d, h, hd), "wk": (L, d, kv, hd),
        "wv": (L, d, kv, hd), "wo": (L, h, hd, d), "ffn_norm": (L, d),
        "w1": (L, d, f), "w3": (L, d, f), "w2": (L, f, d),
        "norm": (d,),
    }
    if not cfg.tie_embeddings:
        shapes["output"] = (d, V)
    if cfg.value_head:
        shapes["value_head"] = (d,)
    return shapes


def param_count(cfg: ModelConfig) -> int:
    """Parameter count from the config's shapes (no allocation)."""
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) plus causal attention.

    The embedding lookup and the norms are no matmuls, so they are left out of N (the
    output head is in, tied or not). Attention: QK^T and AV are 2 matmuls of
    2*seq*head_dim*heads FLOPs per token forward; causal masking halves the useful work;
    x3 for forward+backward.
    """
    shapes = param_shapes(cfg)
    n_matmul = sum(math.prod(shapes[k]) for k in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"))
    n_matmul += cfg.vocab_size * cfg.dim  # the output head
    attn = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # 3 * 2 * 2 * s * h * hd / 2
    return 6.0 * n_matmul + attn


def rope_frequencies(cfg: ModelConfig) -> jnp.ndarray:
    """Rotary frequencies [head_dim // 2] with the Llama 3.1 scaling when configured."""
    hd = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling_factor is None:
        return freqs
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return jnp.where(wavelen < old_len / high, freqs,
                     jnp.where(wavelen > old_len / low, freqs / factor, blended))


def apply_rope(x, cos, sin):
    """Rotate adjacent feature pairs (2i, 2i+1) of x [b, s, heads, hd]; cos/sin [b, s, hd/2]."""
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def block(x, p, cos, sin, segment_ids, positions, cfg: ModelConfig, ordered: bool = True):
    """One pre-norm transformer block; `p` holds this layer's (unstacked) parameters.
    `ordered`: the tokens are in sequence order (see `attention`)."""
    q, k, v = project_qkv(x, p, cos, sin, cfg)
    # Keys and values cover the whole sequence: under context parallelism this constraint
    # is the all-gather of K and V over `cp` (cheap with GQA); queries stay local.
    k = constrain(k, ("batch", "kv_seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "kv_seq", "kv_heads", "head_dim"))
    kv_segment_ids = constrain(segment_ids, ("batch", "kv_seq"))
    kv_positions = constrain(positions, ("batch", "kv_seq"))
    a = attention(q, k, v, segment_ids, kv_segment_ids, positions, kv_positions,
                  impl=cfg.attention_impl, ordered=ordered)
    return finish_block(x, a, p, cfg)


def project_qkv(x, p, cos, sin, cfg: ModelConfig):
    """The block's first half: RMS norm, q/k/v projections and RoPE (also used by the KV-cache
    decoder in `llama3_jax.infer`, so both paths compute the same keys)."""
    cd = x.dtype
    h = constrain(rms_norm(x, p["attention_norm"], cfg.norm_eps), ("batch", "seq", "embed"))
    q, k, v = linear(h, (p["wq"].astype(cd), p["wk"].astype(cd), p["wv"].astype(cd)))
    q = checkpoint_name(constrain(q, ("batch", "seq", "heads", "head_dim")), "q_proj")
    k = checkpoint_name(constrain(k, ("batch", "seq", "kv_heads", "head_dim")), "k_proj")
    v = checkpoint_name(constrain(v, ("batch", "seq", "kv_heads", "head_dim")), "v_proj")
    return apply_rope(q, cos, sin).astype(cd), apply_rope(k, cos, sin).astype(cd), v


def finish_block(x, a, p, cfg: ModelConfig):
    """The block's second half: attention output projection, residual, and the MLP."""
    cd = x.dtype
    a = checkpoint_name(constrain(a, ("batch", "seq", "heads", "head_dim")), "attn_out")
    x = x + constrain(linear(a, (p["wo"].astype(cd),), 2)[0], ("batch", "seq_sp", "embed"))
    h = constrain(rms_norm(x, p["ffn_norm"], cfg.norm_eps), ("batch", "seq", "embed"))
    out = swiglu(h, p["w1"].astype(cd), p["w3"].astype(cd), p["w2"].astype(cd))
    return x + constrain(out, ("batch", "seq_sp", "embed"))


# The matmuls below have written-out backward passes that state which operand is transposed
# for each weight gradient: autodiff's layout choices on XLA:CPU transposed the larger
# activation gradients (up to [tokens, ffn]) through slow strided copies, where the hidden
# states, ffn / dim times smaller, give the same sums.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x, ws: tuple, inputs: int = 1) -> tuple:
    """x @ w for each w in `ws`, over the last `inputs` dimensions of x and the first of w
    (x [b, s, *in], w [*in, *out] -> [b, s, *out]). Weights that share an input (wq, wk, wv)
    go in one call, so the backward pass transposes that input once."""
    return _linear_fwd(x, ws, inputs)[0]


def _contract(a, b, n: int, preferred=None):
    """Contract a's last n dimensions with b's first n, without merging dimensions: a merged
    [b * s] would lose a sequence sharding (context parallelism). A weight that brings its
    own product (`rmatmul`: the inference layouts of `llama3_jax.infer.quant`) computes it."""
    if hasattr(b, "rmatmul"):
        return b.rmatmul(a, n, preferred)
    return jax.lax.dot_general(a, b, ((tuple(range(a.ndim - n, a.ndim)), tuple(range(n))), ((), ())),
                               preferred_element_type=preferred)


def tokens_last(x):
    """[b, s, *in] -> [*in, b, s], materialised from a materialised x (fused, XLA:CPU
    recomputed the RMS norm that makes x once per element of the transpose). The weight
    gradients contract it over (b, s) with the output gradient."""
    barrier = jax.lax.optimization_barrier
    return barrier(jnp.moveaxis(barrier(x), (0, 1), (-2, -1)))


def _linear_fwd(x, ws, inputs):
    return tuple(_contract(x, w, inputs) for w in ws), (x, ws)


def _linear_bwd(inputs, res, dys):
    x, ws = res
    dx = sum(jax.lax.dot_general(dy, w, ((tuple(range(dy.ndim - w.ndim + inputs, dy.ndim)),
                                          tuple(range(inputs, w.ndim))), ((), ())))
             for dy, w in zip(dys, ws))
    xt = tokens_last(x)
    return dx, tuple(_contract(xt, dy, 2) for dy in dys)


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def swiglu(h, w1, w3, w2):
    """The feed-forward network (silu(h @ w1) * (h @ w3)) @ w2, with its backward written out
    (see above)."""
    return _swiglu_fwd(h, w1, w3, w2)[0]


def _swiglu_fwd(h, w1, w3, w2):
    gate = checkpoint_name(constrain(_contract(h, w1, 1), ("batch", "seq", "mlp")), "mlp_gate")
    up = checkpoint_name(constrain(_contract(h, w3, 1), ("batch", "seq", "mlp")), "mlp_up")
    return _contract(jax.nn.silu(gate) * up, w2, 1), (h, w1, w3, w2, gate, up)


def _swiglu_bwd(res, dy):
    h, w1, w3, w2, gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    dact = jnp.einsum("bsd,fd->bsf", dy, w2)
    dgate = dact * up * sig * (1 + gate * (1 - sig))
    dup = dact * silu
    # [dim, b, s] transposes, materialised, contracted over (b, s).
    ht, dyt = tokens_last(h), tokens_last(dy)
    dw1, dw3 = _contract(ht, dgate, 2), _contract(ht, dup, 2)
    dw2 = _contract(dyt, silu * up, 2).T
    dh = jnp.einsum("bsf,df->bsd", dgate, w1) + jnp.einsum("bsf,df->bsd", dup, w3)
    return dh, dw1, dw3, dw2


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rope_angles(cfg: ModelConfig, positions):
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
    return jnp.cos(angles), jnp.sin(angles)


# Named activations of a block (checkpoint_name above) that remat policies keep or offload.
REMAT_NAMES = {"save_qkv_proj": ("q_proj", "k_proj", "v_proj"),
               "save_attn_out": ("q_proj", "k_proj", "v_proj", "attn_out"),
               "offload": ("q_proj", "k_proj", "v_proj", "attn_out", "mlp_gate", "mlp_up")}


def remat_policy(name: str):
    """What the backward pass keeps of a block's forward (model.remat), the rest recomputed:
    full: nothing but the block's input; save_dots: every matmul output; save_qkv_proj /
    save_attn_out: the named projections; offload: those and the MLP's inputs, moved to
    host memory and back."""
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=REMAT_NAMES[name],
            offload_src="device", offload_dst="pinned_host")
    return cp.save_only_these_names(*REMAT_NAMES[name])


def run_layers(x, layers: dict, segment_ids, positions, cfg: ModelConfig, ordered: bool = True):
    """Scan the stacked blocks in `layers` (each leaf [n, ...]) over the residual stream x."""
    cos, sin = rope_angles(cfg, positions)

    def body(carry, p):
        return block(carry, p, cos, sin, segment_ids, positions, cfg, ordered), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(cfg.remat))
    x, _ = jax.lax.scan(body, x, layers)
    return x


def embed_tokens(embedding, tokens, cfg: ModelConfig):
    # A quantized embedding (llama3_jax.infer.quant) looks up and dequantizes its own rows.
    rows = embedding.lookup(tokens) if hasattr(embedding, "lookup") else jnp.take(embedding, tokens, axis=0)
    x = rows.astype(dtype_of(cfg.compute_dtype))
    return constrain(x, ("batch", "seq_sp", "embed"))


def final_hidden(x, norm_weight, cfg: ModelConfig):
    return constrain(rms_norm(x, norm_weight, cfg.norm_eps), ("batch", "seq", "embed"))


def output_head(params: dict, cfg: ModelConfig):
    """The output projection [dim, vocab] (the embedding's transpose when tied); an inference
    layout may bring its own "output" for a tied model."""
    return params["output"] if "output" in params else params["embed"].T


def output_logits(h, params: dict, cfg: ModelConfig):
    """float32 logits [b, s, vocab] (vocab sharded under tensor parallelism)."""
    logits = _contract(h, output_head(params, cfg).astype(h.dtype), 1, jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))


def default_segments(tokens, segment_ids, positions):
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return segment_ids, positions


def hidden_states(params: dict, tokens, segment_ids, positions, cfg: ModelConfig, ordered: bool = True):
    """Final-normed hidden states [b, s, dim] from raw parameter arrays (a pure function).
    `ordered`: each document's tokens are in sequence order (False after context
    parallelism's reordering), so attention may skip the blocks after each query block."""
    segment_ids, positions = default_segments(tokens, segment_ids, positions)
    x = embed_tokens(params["embed"], tokens, cfg)
    x = run_layers(x, {k: params[k] for k in LAYER_PARAMS}, segment_ids, positions, cfg, ordered)
    return final_hidden(x, params["norm"], cfg)


def forward(params: dict, tokens, cfg: ModelConfig, segment_ids=None, positions=None):
    """Logits [b, s, vocab] in float32 from raw parameter arrays (a pure function)."""
    return output_logits(hidden_states(params, tokens, segment_ids, positions, cfg), params, cfg)


def value_of(h, params: dict):
    """The scalar head on final hidden states [..., dim] -> [...] in float32."""
    return jnp.einsum("...d,d->...", h, params["value_head"].astype(h.dtype), preferred_element_type=jnp.float32)


def _init_std(name: str, cfg: ModelConfig) -> float:
    # Residual-branch outputs are scaled down with depth (as GPT-2) to keep early training stable.
    if name in ("wo", "w2"):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


class Llama(nnx.Module):
    """Llama 3. `model(tokens)` -> float32 logits; parameters are `nnx.Param`s named as Meta's."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = dtype_of(cfg.param_dtype)
        for name, shape in param_shapes(cfg).items():
            if name in ("attention_norm", "ffn_norm", "norm"):
                value = jnp.ones(shape, pd)
            else:
                value = _init_std(name, cfg) * jax.random.normal(rngs.params(), shape, pd)
            setattr(self, name, nnx.Param(value, axes=PARAM_AXES[name]))

    def param_arrays(self) -> dict:
        return {name: getattr(self, name)[...] for name in param_shapes(self.cfg)}

    def __call__(self, tokens, segment_ids=None, positions=None):
        return forward(self.param_arrays(), tokens, self.cfg, segment_ids, positions)
