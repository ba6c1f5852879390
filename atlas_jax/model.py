"""Decoder-only transformers in Flax Linen: the `llama` and `gpt2` families, presets over options.

`model.positions` (rope | learned | none), `model.norm` (rms | layer) and `model.mlp` (swiglu | gelu)
default to the family's (llama: rope/rms/swiglu, gpt2: learned/layer/gelu; config.FAMILY_OPTIONS);
`model.arch` alone decides the biases. The param paths below follow the options, so a preset's
params are what they always were.

Params are a plain pytree with readable paths, the same words the GGUF table uses:

    embed/embedding                      [V, D]
    pos_embed/embedding                  [max_seq_len + n, D]      positions=learned only (n = model.sink_tokens)
    sink/embedding                       [n, D]                    model.sink_tokens = n > 0 only
    layers_{i}/attn_norm/{scale,bias}    [D]                       bias: norm=layer only
    layers_{i}/attn/w{q,k,v,o}/kernel    wq [D, H*Dh], wk/wv [D, KV*Dh], wo [H*Dh, D]
    layers_{i}/attn/w{q,k,v,o}/bias      gpt2 only
    layers_{i}/attn/sink                 [H]                       model.sink_logits only
    layers_{i}/mlp_norm/{scale,bias}     [D]
    layers_{i}/mlp/w_gate/kernel         [D, F]                    mlp=swiglu only
    layers_{i}/mlp/w_up/{kernel,bias}    [D, F]
    layers_{i}/mlp/w_down/{kernel,bias}  [F, D]
    layers_{i}/moe/router/kernel         [D, E]                    MoE layers (llama), instead of mlp/
    layers_{i}/moe/w_{gate,up}           [E, D, Fe]                the experts' SwiGLU, stacked (Fe = moe_d_ff)
    layers_{i}/moe/w_down                [E, Fe, D]
    final_norm/{scale,bias}              [D]
    lm_head/kernel                       [D, V]                    untied heads only

RoPE convention (positions=rope): ADJACENT pairs. Dimension pair i of a head is (x[2i], x[2i+1]), rotated by
position * theta^(-2i/Dh). This is how llama.cpp's `llama` architecture (GGML_ROPE_TYPE_NORM)
rotates, so Q/K rows export to GGUF without a permutation. atlas_torch_ref uses the same pairing.

GQA grouping: query head h reads key/value head h // (H / KV) (llama.cpp and `repeat_interleave`).

Implementation switches (same math, tested against each other and against torch): `model.attention`
(`attention_impl`: the grouped einsums or the blocked FlashAttention-2 kernel of atlas_jax.kernels, XLA's
or cuDNN's kernel; the KV-cache decode path always runs the grouped einsums) and
`model.matmul` (`matmul_impl`: the row-major weight gradient of atlas_jax.kernels, or plain XLA)
and `model.moe_impl` (`moe_impl`: how the experts are computed, atlas_jax.moe).

Mixture-of-experts (`model.moe_experts` > 0, llama): the layers `cfg.is_moe_layer(i)` names replace
their MLP with `MoE` (Mixtral routing, atlas_jax.moe). Each sows its load-balancing and router
z-losses into the `moe_aux` collection; `loss_terms` averages them over the MoE layers and
`loss_fn` adds them to the cross-entropy with model.moe_aux_loss_coef / model.moe_z_loss_coef.

Two entry points, sharing params:
- `model.apply(params, tokens_BxT)` -> logits_BxTxV (float32): training and evaluation; packed SFT
  rows add `positions_BxT` and `segment_ids_BxT` (attention kept inside each segment).
- `model.apply(params, tokens_BxT, positions_BxT, cache, method=Transformer.decode)`
  -> (logits_BxTxV, cache): prefill and one-token-at-a-time decoding with a KV cache (`init_cache`).
With `mutable=[ATTENTION_WEIGHTS]` the first one also returns each layer's attention weights
(`layers_{i}/attn/probs`, [B, N, T, S]), sown from the einsum kernel that then computes the layer.

Attention sinks (docs/streaming.md): `model.sink_logits` adds a learned logit per head to every softmax
row (kernels.softmax_with_sink); `model.sink_tokens` = n prepends n learned vectors to every sequence
(positions 0..n-1, real tokens at n..), whose logits are dropped. `init_cache(..., n_sink=k)` makes a
streaming cache (StreamingLLM): keys stored un-rotated, the first k tokens kept and the rest rolled,
RoPE applied at each step with positions within the cache, so decoding runs past max_seq_len.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.config import ModelConfig
from atlas_jax.kernels import (add_bias, blocked_attention_btnh, cached_attention, einsum_attention,
                               einsum_attention_with_probs, from_grouped, is_16bit, rowmajor_grad_dot_general,
                               tied_logits, to_grouped)
from atlas_jax.moe import EXPERT_IMPLS, experts_all_to_all, load_balance_loss, route, router_z_loss

Array = jax.Array
PyTree = Any


def dtype_of(name: str):
    return jnp.dtype(name)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


# --------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), self.param_dtype)
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * scale_D.astype(jnp.float32)


class LayerNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        d = x_BxTxD.shape[-1]
        scale_D = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias_D = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x = x_BxTxD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return x * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    cls = RMSNorm if cfg.norm == "rms" else LayerNorm
    return cls(eps=cfg.norm_eps, param_dtype=dtype_of(cfg.param_dtype), name=name)


# --------------------------------------------------------------------------- rope


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq_i = theta^(-2i/Dh) for i < Dh/2, as llama.cpp computes it."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, theta: float) -> Array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by position * inv_freq_i (float32 math)."""
    h = x_BxTxNxH.shape[-1]
    inv_freq = jnp.asarray(rope_frequencies(h, theta), dtype=jnp.float32)
    angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32).reshape(*x_BxTxNxH.shape[:-1], h // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x_BxTxNxH.shape).astype(x_BxTxNxH.dtype)


# --------------------------------------------------------------------------- attention


@functools.cache
def _has_gpu() -> bool:
    """cuDNN attention needs an NVIDIA GPU; elsewhere model.attention=cudnn runs the XLA kernel."""
    if jax.default_backend() == "gpu":
        return True
    warnings.warn("model.attention=cudnn: no GPU here, using the XLA attention kernel instead", stacklevel=3)
    return False


# On CPU, `auto` runs the blocked (online-softmax) kernel from this many query tokens on, the grouped
# einsums below it (bench longctx, docs/benchmarks.md: blocked is faster from 256, slower at 64).
BLOCKED_MIN_SEQ = 256


def attention_impl(cfg: ModelConfig, seq_len: int | None = None) -> str:
    """model.attention=auto: cuDNN's fused kernel on a GPU in bf16/f16 (it takes no float32), XLA's
    on a GPU in float32; elsewhere the blocked kernel for seq_len >= BLOCKED_MIN_SEQ and the
    written-out grouped einsums below it (the fastest of each measured on CPU)."""
    if cfg.attention != "auto":
        return cfg.attention
    if jax.default_backend() == "gpu" and not cfg.sink_logits:  # sink logits: einsum or blocked only
        return "cudnn" if cfg.compute_dtype in ("bfloat16", "float16") else "xla"
    return "blocked" if seq_len is not None and seq_len >= BLOCKED_MIN_SEQ else "einsum"


@functools.cache
def _warn_cudnn_masked() -> None:
    warnings.warn("model.attention=cudnn: packed rows (segment ids) run XLA's attention kernel, "
                  "cuDNN's is not tested with a segment mask here", stacklevel=3)


def segment_mask(segment_ids_BxT: Array) -> Array:
    """mask_BxTxT: query t sees key s when s <= t and both lie in the same segment (packed rows)."""
    t = segment_ids_BxT.shape[1]
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    return causal_TxT[None] & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])


def attention(q, k, v, impl: str, mask_BxTxS: Array | None = None, sink_N: Array | None = None,
              block: int | None = None) -> Array:
    """Causal attention; q [B,T,N,H], k/v [B,S,K,H], K divides N. mask_BxTxS (True = attend) replaces
    the causal mask when given (packed rows: `segment_mask`); sink_N: per-head sink logits (einsum and
    blocked only, config.validate_sinks). block: blocked's block size (model.attention_block; None:
    kernels.auto_block)."""
    if impl == "einsum":
        return einsum_attention(q, k, v, mask_BxTxS, sink_N)
    if impl == "blocked":
        return blocked_attention_btnh(q, k, v, mask_BxTxS, sink_N, block)
    if mask_BxTxS is not None:
        if impl == "cudnn":
            _warn_cudnn_masked()
        # dot_product_attention's mask broadcasts to [B, N, T, S].
        return jax.nn.dot_product_attention(q, k, v, mask=mask_BxTxS[:, None], implementation="xla")
    implementation = "cudnn" if impl == "cudnn" and _has_gpu() else "xla"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


# --------------------------------------------------------------------------- dense


def matmul_impl(cfg: ModelConfig) -> str:
    """model.matmul=auto: the row-major weight gradient (atlas_jax.kernels) on CPU without remat (a
    remat policy must see plain dot_generals to decide what to save), XLA's dot_general elsewhere."""
    if cfg.matmul != "auto":
        return cfg.matmul
    return "rowmajor" if jax.default_backend() == "cpu" and cfg.remat == "none" else "xla"


class RowMajorDense(nn.Dense):
    """nn.Dense (the same params, kernel [in, out] and bias) for the CPU path: `dot_general` is
    kernels.rowmajor_grad_dot_general, and a 16-bit output gets its bias through kernels.add_bias
    (the bias gradient as an f32-accumulated product). Anything that treats it as an nn.Dense
    (sample.apply_with_layout's interceptor) still does."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = rowmajor_grad_dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
        if bias is None:
            return y
        return add_bias(y, bias) if is_16bit(y.dtype) else y + bias


def make_dense(cfg: ModelConfig, features: int, name: str, std: float, use_bias: bool | None = None) -> nn.Dense:
    """A Dense layer of the model: RowMajorDense or plain nn.Dense, as `matmul_impl` chooses."""
    cls = RowMajorDense if matmul_impl(cfg) == "rowmajor" else nn.Dense
    return cls(features, use_bias=cfg.arch == "gpt2" if use_bias is None else use_bias,
               dtype=dtype_of(cfg.compute_dtype), param_dtype=dtype_of(cfg.param_dtype), kernel_init=_normal(std),
               name=name)


def write_cache(cache_YxSxH: Array, new_BxLxKxH: Array, where: Array, n_sinks: int) -> Array:
    """The new keys or values in a cache [B*K, S, H] (`init_cache`). where: the slot index of the block's
    first token (a plain cache: the L = n_sinks + T rows go to slots 0..n_sinks-1 and n_sinks + where..),
    or slots_BxL (a streaming cache: a scatter, out-of-range slots dropped)."""
    b, l, k, h = new_BxLxKxH.shape
    s = cache_YxSxH.shape[1]
    new = new_BxLxKxH.astype(cache_YxSxH.dtype)
    if where.ndim == 2:  # indexing [b, :, slot] takes the values as [B, L, K, H], the layout they have
        cache_BxKxSxH = cache_YxSxH.reshape(b, k, s, h)
        return cache_BxKxSxH.at[jnp.arange(b)[:, None], :, where].set(new, mode="drop").reshape(b * k, s, h)
    new = new.transpose(0, 2, 1, 3).reshape(b * k, l, h)
    if n_sinks:
        cache_YxSxH = jax.lax.dynamic_update_slice(cache_YxSxH, new[:, :n_sinks], (0, 0, 0))
    return jax.lax.dynamic_update_slice(cache_YxSxH, new[:, n_sinks:], (0, n_sinks + where, 0))


# With this collection mutable (model.apply(..., mutable=[ATTENTION_WEIGHTS])) each layer's full forward
# runs the einsum kernel and sows the softmax it mixes the values with: layers_{i}/attn/probs, ([B, N, T, S],).
ATTENTION_WEIGHTS = "attention_weights"


class Attention(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        out_std = 0.02 / math.sqrt(2 * c.n_layers)
        self.wq = make_dense(c, c.n_heads * c.head_dim, "wq", 0.02)
        self.wk = make_dense(c, c.n_kv_heads * c.head_dim, "wk", 0.02)
        self.wv = make_dense(c, c.n_kv_heads * c.head_dim, "wv", 0.02)
        self.wo = make_dense(c, c.d_model, "wo", out_std)
        if c.sink_logits:
            self.sink = self.param("sink", nn.initializers.zeros, (c.n_heads,), dtype_of(c.param_dtype))

    def __call__(self, x_BxTxD, positions_BxT, kv_cache=None, cache_index=None, mask_BxTxS=None,
                 key_positions_BxS=None):
        """kv_cache: write the new keys/values where cache_index says (`write_cache`) and attend over
        the whole cache under mask_BxTxS. key_positions_BxS (a streaming cache): keys are cached
        un-rotated and rotated here by these positions, queries by positions_BxT."""
        c = self.cfg
        b, t, _ = x_BxTxD.shape
        q = self.wq(x_BxTxD).reshape(b, t, c.n_heads, c.head_dim)
        k = self.wk(x_BxTxD).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self.wv(x_BxTxD).reshape(b, t, c.n_kv_heads, c.head_dim)
        if c.positions == "rope":
            q = apply_rope(q, positions_BxT, c.rope_theta)
            if key_positions_BxS is None:
                k = apply_rope(k, positions_BxT, c.rope_theta)
        sink_N = self.sink.astype(jnp.float32) if c.sink_logits else None
        new_cache = None
        if kv_cache is not None:
            # The cache is head-major [B*K, S, H]: the products read it as it lies (kernels.cached_attention).
            k_all = write_cache(kv_cache["k"], k, cache_index, c.sink_tokens)
            v_all = write_cache(kv_cache["v"], v, cache_index, c.sink_tokens)
            new_cache = {"k": k_all, "v": v_all}
            k_att = k_all.astype(q.dtype)
            if key_positions_BxS is not None:
                s = k_att.shape[1]
                k_BxSxKxH = k_att.reshape(b, c.n_kv_heads, s, c.head_dim).transpose(0, 2, 1, 3)
                k_att = apply_rope(k_BxSxKxH, key_positions_BxS, c.rope_theta).transpose(0, 2, 1, 3).reshape(k_att.shape)
            sink_KxG = None if sink_N is None else sink_N.reshape(c.n_kv_heads, -1)
            out = from_grouped(cached_attention(to_grouped(q, c.n_kv_heads), k_att, v_all.astype(q.dtype),
                                                mask_BxTxS, sink_KxG))
        elif self.is_mutable_collection(ATTENTION_WEIGHTS):  # the einsum kernel, its softmax kept
            out, probs_BxNxTxS = einsum_attention_with_probs(q, k, v, mask_BxTxS, sink_N)
            self.sow(ATTENTION_WEIGHTS, "probs", probs_BxNxTxS)
        else:
            out = attention(q, k, v, attention_impl(c, t), mask_BxTxS, sink_N, c.attention_block)
        return self.wo(out.reshape(b, t, c.n_heads * c.head_dim)), new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        c = self.cfg
        dense = functools.partial(make_dense, c)
        out_std = 0.02 / math.sqrt(2 * c.n_layers)
        if c.mlp == "swiglu":
            gate = dense(c.d_ff, "w_gate", 0.02)(x_BxTxD)
            up = dense(c.d_ff, "w_up", 0.02)(x_BxTxD)
            h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(up.dtype)
        else:
            h = jax.nn.gelu(dense(c.d_ff, "w_up", 0.02)(x_BxTxD), approximate=True)
        return dense(c.d_model, "w_down", out_std)(h)


def moe_impl(cfg: ModelConfig) -> str:
    """model.moe_impl=auto: the block-grouped matmuls on CPU (fastest measured there, scripts/moe_bench.py:
    2-3x dense dispatch, which XLA:CPU's ragged_dot also is underneath), jax.lax.ragged_dot elsewhere."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    return "grouped" if jax.default_backend() == "cpu" else "ragged"


MOE_AUX = "moe_aux"  # the collection MoE layers sow their auxiliary losses into


class MoE(nn.Module):
    """Mixture-of-experts SwiGLU FFN: router softmax over E experts, top k renormalised, sum_k w_k * expert_k(x)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        c = self.cfg
        b, t, d = x_BxTxD.shape
        e, f = c.moe_experts, c.moe_d_ff
        pd, cd = dtype_of(c.param_dtype), dtype_of(c.compute_dtype)
        x_NxD = x_BxTxD.reshape(b * t, d)
        logits_NxE = make_dense(c, e, "router", 0.02, use_bias=False)(x_NxD)
        weights_NxK, experts_NxK, probs_NxE = route(logits_NxE, c.moe_experts_per_token)
        self.sow(MOE_AUX, "load_balance", load_balance_loss(probs_NxE, experts_NxK))
        self.sow(MOE_AUX, "router_z", router_z_loss(logits_NxE))
        out_std = 0.02 / math.sqrt(2 * c.n_layers)
        w_gate = self.param("w_gate", _normal(0.02), (e, d, f), pd).astype(cd)
        w_up = self.param("w_up", _normal(0.02), (e, d, f), pd).astype(cd)
        w_down = self.param("w_down", _normal(out_std), (e, f, d), pd).astype(cd)
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and dict(mesh.shape).get("expert", 1) > 1:
            out_NxD, dropped = expert_parallel(c, mesh, x_NxD, weights_NxK, experts_NxK, w_gate, w_up, w_down)
            self.sow(MOE_AUX, "dropped", dropped)
        else:
            out_NxD = EXPERT_IMPLS[moe_impl(c)](x_NxD, weights_NxK, experts_NxK, w_gate, w_up, w_down)
        return out_NxD.reshape(b, t, d)


def expert_parallel(c: ModelConfig, mesh, x_NxD, weights_NxK, experts_NxK, w_gate, w_up, w_down):
    """The MoE expert compute with the experts split over the mesh's expert axis (P devices) and the
    tokens over all its batch axes: `moe.experts_all_to_all` per device in a shard_map (the step is
    traced under the mesh: train_step.under_mesh). -> (out_NxD, the fraction of assignments dropped)."""
    from jax.sharding import PartitionSpec as P

    from atlas_jax.sharding import BATCH_AXES

    n_dev = dict(mesh.shape)["expert"]
    n_local = x_NxD.shape[0] // math.prod(dict(mesh.shape)[a] for a in BATCH_AXES)
    a_local = n_local * c.moe_experts_per_token
    capacity = (None if c.moe_capacity_factor <= 0
                else min(a_local, max(1, math.ceil(c.moe_capacity_factor * a_local / n_dev))))
    impl = moe_impl(c)

    def per_device(x, w, e, wg, wu, wd):
        out, dropped = experts_all_to_all(x, w, e, wg, wu, wd, impl, "expert", capacity)
        return out, jax.lax.psum(dropped, BATCH_AXES) / (a_local * math.prod(dict(mesh.shape).values()))

    tokens, experts = P(BATCH_AXES), P("expert")
    return jax.shard_map(per_device, mesh=mesh, in_specs=(tokens, tokens, tokens, experts, experts, experts),
                         out_specs=(tokens, P()))(x_NxD, weights_NxK, experts_NxK, w_gate, w_up, w_down)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (or moe(norm(x)))."""

    cfg: ModelConfig
    moe: bool = False

    def setup(self):
        self.attn_norm = make_norm(self.cfg, "attn_norm")
        self.attn = Attention(self.cfg, name="attn")
        self.mlp_norm = make_norm(self.cfg, "mlp_norm")
        self.mlp = MoE(self.cfg, name="moe") if self.moe else MLP(self.cfg, name="mlp")
        self.dropout = nn.Dropout(self.cfg.dropout)

    def __call__(self, x_BxTxD, positions_BxT, deterministic: bool = True,
                 kv_cache=None, cache_index=None, mask_BxTxS=None, key_positions_BxS=None):
        dt = x_BxTxD.dtype
        h = self.attn_norm(x_BxTxD).astype(dt)
        h, new_cache = self.attn(h, positions_BxT, kv_cache, cache_index, mask_BxTxS, key_positions_BxS)
        x_BxTxD = x_BxTxD + self.dropout(h, deterministic=deterministic)
        h = self.mlp(self.mlp_norm(x_BxTxD).astype(dt))
        x_BxTxD = x_BxTxD + self.dropout(h, deterministic=deterministic)
        return x_BxTxD, new_cache


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        unresolved = [k for k in ("positions", "norm", "mlp", "n_kv_heads", "d_ff") if getattr(c, k) is None]
        if unresolved:  # a silent fallback here built another model (no RoPE, LayerNorm, a GELU MLP) for arch llama
            raise ValueError(f"ModelConfig.{', '.join(unresolved)} unset: build the config with "
                             f"atlas_jax.config.resolve_model(ModelConfig(...)), which fills model.arch's defaults")
        pd, cd = dtype_of(c.param_dtype), dtype_of(c.compute_dtype)
        self.embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=_normal(0.02),
                              dtype=cd, param_dtype=pd, name="embed")
        if c.positions == "learned":
            self.pos_embed = nn.Embed(c.max_seq_len + c.sink_tokens, c.d_model, embedding_init=_normal(0.02),
                                      dtype=cd, param_dtype=pd, name="pos_embed")
        if c.sink_tokens:
            self.sink = nn.Embed(c.sink_tokens, c.d_model, embedding_init=_normal(0.02),
                                 dtype=cd, param_dtype=pd, name="sink")
        block = Block
        if c.remat != "none":
            # Argument 0 is the module itself, so `deterministic` (3rd positional) is argnum 3.
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], static_argnums=(3,))
        self.layers = [block(c, c.is_moe_layer(i), name=f"layers_{i}") for i in range(c.n_layers)]
        self.final_norm = make_norm(c, "final_norm")
        if not c.tie_embeddings:
            self.lm_head = make_dense(c, c.vocab_size, "lm_head", 0.02, use_bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def _embed(self, tokens_BxT, positions_BxT, deterministic):
        """-> (x_BxLxD, positions_BxL), L = n + T: a sink-token model (n = model.sink_tokens) prepends its
        n sinks at positions 0..n-1 and moves the tokens to positions + n (padding stays -1)."""
        n = self.cfg.sink_tokens
        x = self.embed(tokens_BxT)
        if n:
            b = tokens_BxT.shape[0]
            x = jnp.concatenate([jnp.broadcast_to(self.sink(jnp.arange(n)), (b, n, x.shape[-1])), x], axis=1)
            positions_BxT = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
                                             jnp.where(positions_BxT >= 0, positions_BxT + n, -1)], axis=1)
        if self.cfg.positions == "learned":
            x = x + self.pos_embed(jnp.maximum(positions_BxT, 0))
        return self.dropout(x, deterministic=deterministic), positions_BxT

    def _head(self, x_BxTxD) -> Array:
        x = self.final_norm(x_BxTxD).astype(dtype_of(self.cfg.compute_dtype))
        if self.cfg.tie_embeddings and is_16bit(x.dtype) and matmul_impl(self.cfg) == "rowmajor":
            return tied_logits(x, self.embed.embedding.astype(x.dtype))  # f32 accumulation (kernels._acc)
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(self, tokens_BxT: Array, deterministic: bool = True, positions_BxT: Array | None = None,
                 segment_ids_BxT: Array | None = None) -> Array:
        """Causal forward over whole sequences -> float32 logits_BxTxV.

        Packed rows (SFT, data.pack): segment_ids_BxT (int, one id per example in the row) keeps
        attention inside each segment (a token sees the earlier tokens of its own segment only);
        positions_BxT (int, restarting at 0 in each segment) feed RoPE / the position table. Either
        None -> the plain causal forward with positions 0..T-1, the same code as without them."""
        b, t = tokens_BxT.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} is longer than model.max_seq_len={self.cfg.max_seq_len}")
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            positions_BxT = positions_BxT.astype(jnp.int32)
        x, positions_BxL = self._embed(tokens_BxT, positions_BxT, deterministic)
        n = self.cfg.sink_tokens
        if segment_ids_BxT is None:
            for layer in self.layers:
                x, _ = layer(x, positions_BxL, deterministic)
        else:
            # Sinks: a segment of their own that every later token also sees.
            segments_BxL = jnp.concatenate([jnp.full((b, n), -1, segment_ids_BxT.dtype), segment_ids_BxT], axis=1)
            sink_cols_LxL = jnp.tril(jnp.ones((n + t, n + t), bool)) & (jnp.arange(n + t) < n)[None, :]
            mask_BxLxL = segment_mask(segments_BxL) | sink_cols_LxL[None]
            for layer in self.layers:
                x, _ = layer(x, positions_BxL, deterministic, None, None, mask_BxLxL)
        return self._head(x[:, n:])

    def decode(self, tokens_BxT: Array, positions_BxT: Array, cache: PyTree):
        """Run T new tokens against a KV cache (prefill when T > 1, a decode step when T == 1).

        positions_BxT: each token's position in its own sequence, -1 for padding (left-padded
        prompts): padding never serves as a key. The tokens land in cache slots
        [cache["index"], cache["index"] + T) (after the model's sink tokens, which every call runs
        again into slots 0..n-1: they see only each other, so their keys come out the same); a query
        sees the earlier slots holding real tokens. Returns float32 logits_BxTxV and the updated cache.
        The caller sizes the cache: writing past its last slot is not detected inside jit (sample.py
        checks lengths before it starts).

        A streaming cache (`init_cache(..., n_sink=k)`, llama) of S slots instead puts the token at
        position p in slot p while p < S, then in keep + (p - keep) % (S - keep) (keep = n + k: the
        first tokens stay, the rest roll); padding is not written. Its keys are rotated at each call
        with positions within the cache: the first keep as they are, the others moved down by the
        number of tokens evicted (max(0, p_last + 1 - S)), the queries likewise, so the newest token
        sits at S - 1. A call may write at most the slots no earlier query of it still needs: any
        number of tokens while p < S, one at a time after that (sample.py and eval.streaming do so).
        """
        b, t = tokens_BxT.shape
        n = self.cfg.sink_tokens
        x, pos_BxL = self._embed(tokens_BxT, positions_BxT.astype(jnp.int32), True)
        s = cache["pos"].shape[1]
        slot_S = jnp.arange(s)
        index = cache["index"]
        key_pos_BxS = None
        if "keep" in cache:  # streaming
            keep = cache["keep"]
            slots_BxL = jnp.where(pos_BxL < s, pos_BxL, keep + (pos_BxL - keep) % (s - keep))
            slots_BxL = jnp.where(pos_BxL >= 0, slots_BxL, s)  # padding: dropped
            pos_BxS = cache["pos"].at[jnp.arange(b)[:, None], slots_BxL].set(pos_BxL, mode="drop")
            where = slots_BxL
            # A padded query sees slot 0, so no softmax row is empty.
            mask_BxLxS = ((pos_BxS[:, None, :] >= 0) & (pos_BxS[:, None, :] <= pos_BxL[:, :, None])) | \
                         ((pos_BxL[:, :, None] < 0) & (slot_S == 0)[None, None, :])
            shift_Bx1 = jnp.maximum(0, pos_BxL.max(axis=1, keepdims=True) + 1 - s)
            key_pos_BxS = jnp.where(pos_BxS < keep, pos_BxS, pos_BxS - shift_Bx1).clip(0)
            rope_pos_BxL = jnp.where(pos_BxL < keep, pos_BxL, pos_BxL - shift_Bx1).clip(0)
        else:
            slots_L = jnp.concatenate([jnp.arange(n), n + index + jnp.arange(t)])
            pos_BxS = write_cache(cache["pos"][:, :, None], pos_BxL[:, :, None, None], index, n)[:, :, 0]
            where = index
            causal_LxS = slot_S[None, :] <= slots_L[:, None]
            # A padded query sees its own slot, so no softmax row is empty.
            mask_BxLxS = causal_LxS[None] & ((pos_BxS[:, None, :] >= 0) | (slot_S[None, None, :] == slots_L[None, :, None]))
            rope_pos_BxL = jnp.maximum(pos_BxL, 0)
        new_layers = []
        for layer, kv in zip(self.layers, cache["layers"]):
            x, new_kv = layer(x, rope_pos_BxL, True, kv, where, mask_BxLxS, key_pos_BxS)
            new_layers.append(new_kv)
        new_cache = {**cache, "layers": new_layers, "pos": pos_BxS, "index": index + t}
        return self._head(x[:, n:]), new_cache


# --------------------------------------------------------------------------- helpers


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=None,
               n_sink: int | None = None) -> PyTree:
    """An empty KV cache: per layer k/v [B*KV, S, Dh] (row b*KV + k: sequence b's key head k; the layout
    kernels.cached_attention reads as it lies), slot positions [B, S] (-1 = empty),
    S = model.sink_tokens + max_len tokens. n_sink given: a streaming cache (`Transformer.decode`) that
    keeps the sink tokens and the first n_sink tokens and rolls the others (max_len is its window)."""
    s = cfg.sink_tokens + (max_len or cfg.max_seq_len)
    dtype = dtype or dtype_of(cfg.compute_dtype)
    shape = (batch * cfg.n_kv_heads, s, cfg.head_dim)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
    cache = {"layers": layers, "pos": jnp.full((batch, s), -1, jnp.int32), "index": jnp.array(0, jnp.int32)}
    if n_sink is not None:
        if cfg.arch != "llama" or not 0 <= n_sink < max_len:
            raise ValueError(f"a streaming cache needs arch llama and 0 <= n_sink < max_len, got {cfg.arch}, "
                             f"n_sink={n_sink}, max_len={max_len}")
        cache["keep"] = jnp.array(cfg.sink_tokens + n_sink, jnp.int32)
    return cache


def init_params(cfg: ModelConfig, key: Array) -> PyTree:
    """Random params (plain pytree). The trainer creates them sharded instead (eval_shape + jit)."""
    model = Transformer(cfg)
    return model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array | None = None) -> tuple[Array, Array]:
    """Summed token NLL (float32) and the number of tokens it covers."""
    logits = logits_BxTxV.astype(jnp.float32)
    # logsumexp - target logit: one pass fewer over [B, T, V] than log_softmax then a gather.
    target_BxT = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll_BxT = jax.nn.logsumexp(logits, axis=-1) - target_BxT
    if weights_BxT is None:
        weights_BxT = jnp.ones_like(nll_BxT)
    return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT)


LOSS_TERMS = ("loss", "moe_load_balance", "moe_router_z")  # loss_terms' keys (the last two: MoE models)


def loss_terms(params: PyTree, cfg: ModelConfig, tokens_BxT: Array, targets_BxT: Array,
               dropout_key: Array | None = None, weights_BxT: Array | None = None,
               normalizer: Array | None = None, positions_BxT: Array | None = None,
               segment_ids_BxT: Array | None = None) -> dict[str, Array]:
    """{"loss": mean next-token cross-entropy in nats} and, for MoE models, the unweighted auxiliary
    losses averaged over the MoE layers: "moe_load_balance" (1.0 when balanced) and "moe_router_z".
    weights_BxT: per-target weights (SFT's loss mask); normalizer: divide the weighted sum by this
    instead of the weights' own sum (a whole batch's count, for microbatches); positions_BxT /
    segment_ids_BxT: packed rows (`Transformer.__call__`; the batch's "positions" / "segment_ids")."""
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    model = Transformer(cfg)
    if cfg.moe_experts == 0:
        logits = model.apply({"params": params}, tokens_BxT, dropout_key is None, positions_BxT, segment_ids_BxT,
                             rngs=rngs)
        total, count = cross_entropy(logits, targets_BxT, weights_BxT)
        return {"loss": total / (count if normalizer is None else normalizer)}
    logits, sown = model.apply({"params": params}, tokens_BxT, dropout_key is None, positions_BxT, segment_ids_BxT,
                               rngs=rngs, mutable=[MOE_AUX])
    total, count = cross_entropy(logits, targets_BxT, weights_BxT)
    terms = {"loss": total / (count if normalizer is None else normalizer)}
    for name, key in zip(LOSS_TERMS[1:], ("load_balance", "router_z")):
        values = [v for path, v in jax.tree_util.tree_flatten_with_path(sown[MOE_AUX])[0]
                  if any(getattr(p, "key", None) == key for p in path)]
        terms[name] = jnp.mean(jnp.stack(values))
    dropped = [v for path, v in jax.tree_util.tree_flatten_with_path(sown[MOE_AUX])[0]
               if any(getattr(p, "key", None) == "dropped" for p in path)]
    if dropped:  # expert parallelism with a capacity: the fraction of assignments dropped, over the MoE layers
        terms["moe_dropped"] = jnp.mean(jnp.stack(dropped))
    return terms


def objective(terms: dict[str, Array], cfg: ModelConfig) -> Array:
    """What training minimises: the cross-entropy plus the MoE auxiliary losses times their coefficients."""
    if cfg.moe_experts == 0:
        return terms["loss"]
    return terms["loss"] + cfg.moe_aux_loss_coef * terms["moe_load_balance"] + cfg.moe_z_loss_coef * terms["moe_router_z"]


def loss_fn(params: PyTree, cfg: ModelConfig, tokens_BxT: Array, targets_BxT: Array,
            dropout_key: Array | None = None) -> Array:
    """The training objective: mean next-token cross-entropy in nats (+ the MoE auxiliary losses)."""
    return objective(loss_terms(params, cfg, tokens_BxT, targets_BxT, dropout_key), cfg)


EXPERT_LEAVES = ("w_gate", "w_up", "w_down")  # the stacked [E, ...] expert tensors of a MoE layer


def count_params(params: PyTree, cfg: ModelConfig | None = None) -> dict[str, int]:
    """Total parameters, non-embedding ones (token and position tables excluded, as in GPT-2/Kaplan),
    and active ones (what one token computes with: a MoE layer's k of E experts, the router, the rest;
    equal to total for a dense model) and active non-embedding ones."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    total = sum(int(np.prod(x.shape)) for _, x in flat)
    emb = sum(int(np.prod(x.shape)) for path, x in flat
              if jax.tree_util.keystr(path).startswith(("['embed']", "['pos_embed']")))
    inactive = 0
    for path, x in flat:
        keys = [getattr(p, "key", None) for p in path]
        if len(keys) >= 2 and keys[-2] == "moe" and keys[-1] in EXPERT_LEAVES:
            e = x.shape[0]
            k = cfg.moe_experts_per_token if cfg is not None else e
            inactive += int(np.prod(x.shape)) // e * (e - k)
    return {"total": total, "non_embedding": total - emb, "active": total - inactive,
            "active_non_embedding": total - emb - inactive}


def count_params_from_config(cfg: ModelConfig) -> dict[str, int]:
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return count_params(shapes, cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM/nanoGPT convention used for MFU:
    6 * (non-embedding params + the output projection D*V) + 12 * n_layers * d_model * seq_len.
    An untied head (lm_head) is already among the non-embedding params; a tied one is added. A MoE
    layer counts the k experts a token runs and its router, not all E (`active_non_embedding`), so
    MFU counts the work done; the grouped/dense implementations' padding or extra experts are not work."""
    n = count_params_from_config(cfg)["active_non_embedding"] + (cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len
