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

import math

import jax
import jax.numpy as jnp
from flax import nnx

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


def block(x, p, cos, sin, segment_ids, positions, cfg: ModelConfig):
    """One pre-norm transformer block; `p` holds this layer's (unstacked) parameters."""
    cd = x.dtype

    def mm(spec, a, w):
        return jnp.einsum(spec, a, w.astype(cd))

    h = constrain(rms_norm(x, p["attention_norm"], cfg.norm_eps), ("batch", "seq", "embed"))
    q = constrain(mm("bsd,dhk->bshk", h, p["wq"]), ("batch", "seq", "heads", "head_dim"))
    k = constrain(mm("bsd,dhk->bshk", h, p["wk"]), ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(mm("bsd,dhk->bshk", h, p["wv"]), ("batch", "seq", "kv_heads", "head_dim"))
    q = apply_rope(q, cos, sin).astype(cd)
    k = apply_rope(k, cos, sin).astype(cd)
    # Keys and values cover the whole sequence: under context parallelism this constraint
    # is the all-gather of K and V over `cp` (cheap with GQA); queries stay local.
    k = constrain(k, ("batch", "kv_seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "kv_seq", "kv_heads", "head_dim"))
    kv_segment_ids = constrain(segment_ids, ("batch", "kv_seq"))
    kv_positions = constrain(positions, ("batch", "kv_seq"))
    a = attention(q, k, v, segment_ids, kv_segment_ids, positions, kv_positions,
                  impl=cfg.attention_impl)
    a = constrain(a, ("batch", "seq", "heads", "head_dim"))
    x = x + constrain(mm("bshk,hkd->bsd", a, p["wo"]), ("batch", "seq_sp", "embed"))

    h = constrain(rms_norm(x, p["ffn_norm"], cfg.norm_eps), ("batch", "seq", "embed"))
    gate = constrain(mm("bsd,df->bsf", h, p["w1"]), ("batch", "seq", "mlp"))
    up = constrain(mm("bsd,df->bsf", h, p["w3"]), ("batch", "seq", "mlp"))
    out = mm("bsf,fd->bsd", jax.nn.silu(gate) * up, p["w2"])
    return x + constrain(out, ("batch", "seq_sp", "embed"))


def rope_angles(cfg: ModelConfig, positions):
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
    return jnp.cos(angles), jnp.sin(angles)


def run_layers(x, layers: dict, segment_ids, positions, cfg: ModelConfig):
    """Scan the stacked blocks in `layers` (each leaf [n, ...]) over the residual stream x."""
    cos, sin = rope_angles(cfg, positions)

    def body(carry, p):
        return block(carry, p, cos, sin, segment_ids, positions, cfg), None

    if cfg.remat == "full":
        body = jax.checkpoint(body, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, layers)
    return x


def embed_tokens(embedding, tokens, cfg: ModelConfig):
    x = jnp.take(embedding, tokens, axis=0).astype(dtype_of(cfg.compute_dtype))
    return constrain(x, ("batch", "seq_sp", "embed"))


def final_hidden(x, norm_weight, cfg: ModelConfig):
    return constrain(rms_norm(x, norm_weight, cfg.norm_eps), ("batch", "seq", "embed"))


def output_logits(h, params: dict, cfg: ModelConfig):
    """float32 logits [b, s, vocab] (vocab sharded under tensor parallelism)."""
    head = params["embed"].T if cfg.tie_embeddings else params["output"]
    logits = jnp.einsum("bsd,dv->bsv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))


def default_segments(tokens, segment_ids, positions):
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return segment_ids, positions


def hidden_states(params: dict, tokens, segment_ids, positions, cfg: ModelConfig):
    """Final-normed hidden states [b, s, dim] from raw parameter arrays (a pure function)."""
    segment_ids, positions = default_segments(tokens, segment_ids, positions)
    x = embed_tokens(params["embed"], tokens, cfg)
    x = run_layers(x, {k: params[k] for k in LAYER_PARAMS}, segment_ids, positions, cfg)
    return final_hidden(x, params["norm"], cfg)


def forward(params: dict, tokens, cfg: ModelConfig, segment_ids=None, positions=None):
    """Logits [b, s, vocab] in float32 from raw parameter arrays (a pure function)."""
    return output_logits(hidden_states(params, tokens, segment_ids, positions, cfg), params, cfg)


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
