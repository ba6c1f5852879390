"""CPU-tuned kernels: the same math as the plain ops, laid out so XLA:CPU does not transpose big tensors.

Each was found in a profile of the CPU training step (docs/benchmarks.md) and is selected by the
model, never called by users directly:

- `grouped_attention`: causal attention in the grouped, head-major layout [B, K, G, T, H] with
  custom gradients (`grouped_scores`, `grouped_mix`) whose dK and dV are computed from transposed
  small operands (`kv_side_grad`). `model.attention=einsum` (and `auto` on CPU) picks it.
  `grouped_probs` is its softmax, which `einsum_attention_with_probs` also returns (the attention
  maps of atlas_jax.viz: the weights the kernel mixes the values with, not a recomputation).
- `blocked_attention`: the same attention without the [T, S] scores (FlashAttention-2 on the CPU:
  online softmax over [block, block] tiles, only the lower-triangular block pairs, a custom gradient
  that recomputes the scores from the output and the rows' logsumexp). `model.attention=blocked`
  picks it for the training/eval forward; memory O(T * block), and faster than the einsums from
  T=256 up at the shakespeare width (bench longctx). The KV-cache decode path keeps the einsums.
- `cached_attention`: the same attention over a KV cache stored [B*K, S, H] (decoding, no gradient),
  laid out so that XLA:CPU updates the cache in place and never copies or transposes it per step.
- `rowmajor_grad_dot_general`: nn.Dense's dot_general whose weight gradient x^T g keeps g
  row-major. The model uses it on CPU when no remat policy needs to see plain dot_generals.
- `tied_logits`, `add_bias`: the tied LM head and a Dense bias for 16-bit compute on CPU, their
  products (the bias gradient a ones-vector product) accumulated in f32 (`_acc`), as the Dense
  products and the blocked kernel's are.

Every function here returns what its plain counterpart returns (tests/unit/test_model.py and the
parity suite hold them to the XLA kernel and to torch).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


# --------------------------------------------------------------------------- grouped attention


def _flat_t(x_BxKxGxTxH: Array) -> Array:
    """[B, K, G, T, H] -> [B, K, H, G*T], materialised (the barrier keeps XLA from folding the transpose
    into the product that reads it, which would then transpose the [.., G*T, S] operand instead)."""
    b, k, g, t, h = x_BxKxGxTxH.shape
    return jax.lax.optimization_barrier(x_BxKxGxTxH.reshape(b, k, g * t, h).transpose(0, 1, 3, 2))


def kv_side_grad(x_BxKxGxTxH: Array, d_BxKxGxTxS: Array) -> Array:
    """sum over g, t of d[.., g, t, s] x[.., g, t, h] -> [B, K, S, H] (the gradient of keys or values),
    computed as x^T d so that the [G*T, S] operand is read row-major: on CPU, XLA otherwise transposes
    the whole score-sized tensor (at seq 1024 that was a third of the step)."""
    b, k, g, t, s = d_BxKxGxTxS.shape
    out_BxKxHxS = jnp.einsum("bkhx,bkxs->bkhs", _flat_t(x_BxKxGxTxH), d_BxKxGxTxS.reshape(b, k, g * t, s))
    return out_BxKxHxS.transpose(0, 1, 3, 2)


@jax.custom_vjp
def grouped_scores(q_BxKxGxTxH: Array, k_BxKxSxH: Array) -> Array:
    """q . k for every query head of a group against its key head: scores_BxKxGxTxS."""
    return jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH)


def _scores_bwd(res, ds):
    q, k = res
    return jnp.einsum("bkgts,bksh->bkgth", ds, k).astype(q.dtype), kv_side_grad(q, ds).astype(k.dtype)


grouped_scores.defvjp(lambda q, k: (grouped_scores(q, k), (q, k)), _scores_bwd)


@jax.custom_vjp
def grouped_mix(p_BxKxGxTxS: Array, v_BxKxSxH: Array) -> Array:
    """Attention probabilities times values: out_BxKxGxTxH."""
    return jnp.einsum("bkgts,bksh->bkgth", p_BxKxGxTxS, v_BxKxSxH)


def _mix_bwd(res, do):
    p, v = res
    return jnp.einsum("bkgth,bksh->bkgts", do, v).astype(p.dtype), kv_side_grad(do, p).astype(v.dtype)


grouped_mix.defvjp(lambda p, v: (grouped_mix(p, v), (p, v)), _mix_bwd)


def softmax_with_sink(scores: Array, sink_KxG: Array | None) -> Array:
    """softmax over the last axis; with per-head sink logits (gpt-oss), over [scores, sink] with the
    sink's column dropped: each row's probabilities then sum to less than 1. scores [B, K, G, T, S]."""
    if sink_KxG is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = jnp.broadcast_to(sink_KxG.astype(scores.dtype)[:, :, None, None], scores.shape[:-1] + (1,))
    m = jax.lax.stop_gradient(jnp.maximum(scores.max(-1, keepdims=True), sink))
    e = jnp.exp(scores - m)
    return e / (e.sum(-1, keepdims=True) + jnp.exp(sink - m))


def grouped_probs(q_BxKxGxTxH: Array, k_BxKxSxH: Array, mask_BxTxS: Array | None,
                  sink_KxG: Array | None = None) -> Array:
    """The softmax attention weights `grouped_attention` mixes the values with: probs_BxKxGxTxS (float32),
    causal when mask is None, each row summing to 1 (less than 1 with sink logits: `softmax_with_sink`)."""
    h = q_BxKxGxTxH.shape[-1]
    t, s = q_BxKxGxTxH.shape[3], k_BxKxSxH.shape[2]
    scores = grouped_scores(q_BxKxGxTxH, k_BxKxSxH).astype(jnp.float32) / math.sqrt(h)
    if mask_BxTxS is None:
        mask = jnp.tril(jnp.ones((t, s), bool), s - t)
    else:
        mask = mask_BxTxS[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return softmax_with_sink(scores, sink_KxG)


def grouped_attention(q_BxKxGxTxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array,
                      mask_BxTxS: Array | None, sink_KxG: Array | None = None) -> Array:
    """Attention written out in the grouped, head-major layout: causal when mask is None; sink_KxG:
    learned sink logits per query head (`softmax_with_sink`).

    Query head k*G + g reads key/value head k. The scores stay [B, K, G, T, S] from the first
    einsum to the second, so no layout change of the biggest tensor happens in between (on CPU
    that is ~5% of a training step against jax.nn.dot_product_attention's [B, T, N, H] path), and
    the backward computes dK and dV from transposed small operands (`kv_side_grad`). Returns
    out_BxKxGxTxH.
    """
    probs = grouped_probs(q_BxKxGxTxH, k_BxKxSxH, mask_BxTxS, sink_KxG).astype(v_BxKxSxH.dtype)
    return grouped_mix(probs, v_BxKxSxH)


def cached_attention(q_BxKxGxTxH: Array, k_YxSxH: Array, v_YxSxH: Array, mask_BxTxS: Array,
                     sink_KxG: Array | None = None) -> Array:
    """`grouped_attention` over a KV cache whose batch and key-head axes are one, k/v [B*K, S, H] (no
    gradient). Laid out for XLA:CPU, which otherwise copies every layer's whole cache at every decode step:
    - the products read the cache as it is stored: a [B, K, S, H] cache meets them through a reshape,
      and XLA then makes two in-place updates of it (one for the carried cache, one for the product)
      and copies the cache for each;
    - the scores are k . q^T, [B*K, S, G*T], transposed afterwards (small when decoding): q . k^T made
      XLA transpose the whole key cache to put its contracting axis first."""
    b, kv, g, t, h = q_BxKxGxTxH.shape
    s = k_YxSxH.shape[1]
    scores_YxSxX = jnp.einsum("ysh,yxh->ysx", k_YxSxH, q_BxKxGxTxH.reshape(b * kv, g * t, h))
    scores = scores_YxSxX.reshape(b, kv, s, g, t).transpose(0, 1, 3, 4, 2).astype(jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs_YxXxS = softmax_with_sink(scores, sink_KxG).astype(v_YxSxH.dtype).reshape(b * kv, g * t, s)
    return jnp.einsum("yxs,ysh->yxh", probs_YxXxS, v_YxSxH).reshape(b, kv, g, t, h)


def to_grouped(q_BxTxNxH: Array, n_kv_heads: int) -> Array:
    """[B, T, N, H] -> [B, K, G, T, H] with N = K * G (query head k*G + g reads key head k)."""
    b, t, n, h = q_BxTxNxH.shape
    return q_BxTxNxH.reshape(b, t, n_kv_heads, n // n_kv_heads, h).transpose(0, 2, 3, 1, 4)


def from_grouped(out_BxKxGxTxH: Array) -> Array:
    b, k, g, t, h = out_BxKxGxTxH.shape
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def einsum_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array | None,
                     sink_N: Array | None = None) -> Array:
    """`grouped_attention` on the [B, T, N, H] / [B, S, K, H] layout the projections produce."""
    kv = k_BxSxKxH.shape[2]
    sink_KxG = None if sink_N is None else sink_N.reshape(kv, -1)
    out = grouped_attention(to_grouped(q_BxTxNxH, kv), k_BxSxKxH.transpose(0, 2, 1, 3),
                            v_BxSxKxH.transpose(0, 2, 1, 3), mask_BxTxS, sink_KxG)
    return from_grouped(out)


def einsum_attention_with_probs(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                                mask_BxTxS: Array | None, sink_N: Array | None = None) -> tuple[Array, Array]:
    """`einsum_attention`'s output and the weights it mixed the values with, probs_BxNxTxS (query
    head n = k*G + g): the same computation as `grouped_attention`, its probabilities kept."""
    kv = k_BxSxKxH.shape[2]
    sink_KxG = None if sink_N is None else sink_N.reshape(kv, -1)
    probs = grouped_probs(to_grouped(q_BxTxNxH, kv), k_BxSxKxH.transpose(0, 2, 1, 3), mask_BxTxS, sink_KxG)
    out = grouped_mix(probs.astype(v_BxSxKxH.dtype), v_BxSxKxH.transpose(0, 2, 1, 3))
    b, k, g, t, s = probs.shape
    return from_grouped(out), probs.reshape(b, k * g, t, s)


# --------------------------------------------------------------------------- 16-bit accumulation


def _acc(*operands) -> dict:
    """dot_general's preferred_element_type for these operands: float32 accumulation when any is a
    16-bit float. XLA:CPU runs a bf16 x bf16 -> bf16 product at 293-342 GFLOP/s and the same product
    -> f32 at 797-919 on an AVX512-BF16 CPU (2048^3, 2 cores; f32 x f32: 428-481, docs/benchmarks.md),
    so the result is accumulated and returned in f32, then rounded once to the operands' dtype by the
    caller."""
    return {"preferred_element_type": jnp.float32} if any(is_16bit(o.dtype) for o in operands) else {}


def is_16bit(dtype) -> bool:
    """bfloat16 or float16: the dtypes whose products `_acc` accumulates in f32."""
    return dtype in (jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------- blocked attention


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _block_scores(qs_i, k_j, i, j, block: int, mask_BxTxS, diagonal: bool) -> Array:
    """Scores of (prescaled) query block i against key block j, [B, K, G, Bq, Bk] float32, masked
    with finfo.min (as `grouped_probs`) by the packed-rows mask's [i, j] tile when given, and by
    position on the diagonal tile only (every tile left of it is wholly below the diagonal)."""
    s = jnp.einsum("bkgth,bksh->bkgts", qs_i, k_j, **_acc(qs_i)).astype(jnp.float32)
    keep = None
    if diagonal:
        keep = jnp.tril(jnp.ones((block, block), bool))[None, None, None]
    if mask_BxTxS is not None:
        tile = jax.lax.dynamic_slice(mask_BxTxS, (0, i * block, j * block), (mask_BxTxS.shape[0], block, block))
        keep = tile[:, None, None] if keep is None else keep & tile[:, None, None]
    return s if keep is None else jnp.where(keep, s, jnp.finfo(jnp.float32).min)


def _blocks(x: Array, axis: int, block: int) -> Array:
    """[.., n*block, ..] -> [n, .., block, ..]: the blocks along `axis` stacked first (scan's xs)."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: Array, axis: int) -> Array:
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _prescaled(q: Array) -> Array:
    """q / sqrt(H): the blocked kernel scales q once, not each tile's scores."""
    return q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def _blocked_fwd(qs, k, v, mask_BxTxS, sink_KxG, block):
    """Online softmax (FlashAttention-2's forward): for each query block, the key blocks left of
    the diagonal (no position mask), then the diagonal block, with a running max m, denominator l
    and unnormalised output acc. qs: q already scaled by 1/sqrt(H) (`_prescaled`). Returns
    out_BxKxGxTxH and lse_BxKxGxT (the row's logsumexp, the sink's term included)."""
    b, kh, g, t, h = qs.shape
    f32min = jnp.finfo(jnp.float32).min
    if sink_KxG is None:
        m0 = jnp.full((b, kh, g, block), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((b, kh, g, block), jnp.float32)
    else:  # the sink is a column with logit sink and value 0: it starts the running max and sum
        m0 = jnp.broadcast_to(sink_KxG.astype(jnp.float32)[None, :, :, None], (b, kh, g, block))
        l0 = jnp.ones((b, kh, g, block), jnp.float32)

    def row_block(_, xs):
        i, qs_i = xs

        def key_block(j, carry, diagonal=False):
            m, l, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
            s = _block_scores(qs_i, k_j, i, j, block, mask_BxTxS, diagonal)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), v_j, **_acc(v_j)).astype(jnp.float32)
            acc = alpha[..., None] * acc + pv
            return m_new, l, acc

        acc0 = jnp.zeros((b, kh, g, block, h), jnp.float32)
        carry = jax.lax.fori_loop(0, i, key_block, (m0, l0, acc0))
        m, l, acc = key_block(i, carry, diagonal=True)
        m = jnp.maximum(m, f32min)  # a row with every key masked and no sink: finite, as grouped_probs
        return None, ((acc / l[..., None]).astype(qs.dtype), m + jnp.log(l))

    n = t // block
    _, (out, lse) = jax.lax.scan(row_block, None, (jnp.arange(n), _blocks(qs, 3, block)))
    return _unblocks(out, 3), _unblocks(lse, 3)


def _blocked_bwd(qs, k, v, mask_BxTxS, sink_KxG, block, out, lse, do):
    """FlashAttention-2's backward: scores recomputed block by block (off-diagonal tiles unmasked,
    as in the forward), P = exp(S - lse), D = rowsum(dO * O), dS = P * (dP - D); dQ per query
    block, dK and dV accumulated over them. With q prescaled, dK = dS^T (q / sqrt(H)) needs no
    further scale and dQ = (dS K) / sqrt(H) is scaled once per block."""
    b, kh, g, t, h = qs.shape
    scale = 1.0 / math.sqrt(h)
    d_BxKxGxT = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1)

    def row_block(carry, xs):
        dk, dv = carry
        i, qs_i, do_i, lse_i, d_i = xs

        def key_block(j, c, diagonal=False):
            dq_i, dk, dv = c
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
            s = _block_scores(qs_i, k_j, i, j, block, mask_BxTxS, diagonal)
            p = jnp.exp(s - lse_i[..., None])
            dp = jnp.einsum("bkgth,bksh->bkgts", do_i, v_j, **_acc(do_i, v_j)).astype(jnp.float32)
            ds = (p * (dp - d_i[..., None])).astype(qs.dtype)
            dv_j = jnp.einsum("bkgts,bkgth->bksh", p.astype(do_i.dtype), do_i, **_acc(do_i)).astype(jnp.float32)
            dk_j = jnp.einsum("bkgts,bkgth->bksh", ds, qs_i, **_acc(ds)).astype(jnp.float32)
            dq_i = dq_i + jnp.einsum("bkgts,bksh->bkgth", ds, k_j, **_acc(ds)).astype(jnp.float32)
            at = (0, 0, j * block, 0)
            dk = jax.lax.dynamic_update_slice(dk, jax.lax.dynamic_slice(dk, at, dk_j.shape) + dk_j, at)
            dv = jax.lax.dynamic_update_slice(dv, jax.lax.dynamic_slice(dv, at, dv_j.shape) + dv_j, at)
            return dq_i, dk, dv

        dq0 = jnp.zeros((b, kh, g, block, h), jnp.float32)
        c = jax.lax.fori_loop(0, i, key_block, (dq0, dk, dv))
        dq_i, dk, dv = key_block(i, c, diagonal=True)
        return (dk, dv), dq_i * scale

    n = t // block
    zeros = jnp.zeros(k.shape, jnp.float32)
    xs = (jnp.arange(n), _blocks(qs, 3, block), _blocks(do, 3, block), _blocks(lse, 3, block),
          _blocks(d_BxKxGxT, 3, block))
    (dk, dv), dq = jax.lax.scan(row_block, (zeros, zeros), xs)
    dq = _unblocks(dq, 3).astype(qs.dtype)
    # The sink column: value 0, so dP = 0 there and dS_sink = -p_sink * D.
    dsink = None if sink_KxG is None else \
        (-jnp.exp(sink_KxG.astype(jnp.float32)[None, :, :, None] - lse) * d_BxKxGxT).sum((0, 3)).astype(sink_KxG.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dsink


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(q, k, v, mask_BxTxS, sink_KxG, block):
    return _blocked_fwd(_prescaled(q), k, v, mask_BxTxS, sink_KxG, block)[0]


def _blocked_vjp_fwd(q, k, v, mask_BxTxS, sink_KxG, block):
    qs = _prescaled(q)  # kept for the backward, which needs q only scaled
    out, lse = _blocked_fwd(qs, k, v, mask_BxTxS, sink_KxG, block)
    return out, (qs, k, v, mask_BxTxS, sink_KxG, out, lse)


def _blocked_vjp_bwd(block, res, do):
    qs, k, v, mask_BxTxS, sink_KxG, out, lse = res
    dq, dk, dv, dsink = _blocked_bwd(qs, k, v, mask_BxTxS, sink_KxG, block, out, lse, do)
    return dq, dk, dv, None, dsink


_blocked.defvjp(_blocked_vjp_fwd, _blocked_vjp_bwd)


# auto_block: the score tile [B, N, block, block] in float32 stays at or under this many elements.
AUTO_BLOCK_TILE = 2 ** 20
AUTO_BLOCKS = (256, 128, 64)


def auto_block(batch: int, n_heads: int, seq_len: int) -> int:
    """The block size `model.attention_block` None picks: the largest of 256, 128, 64 that leaves at
    least 4 blocks along the sequence (fewer blocks waste more of the masked diagonal tiles) and
    whose score tile, batch * heads * block^2 floats, stays within AUTO_BLOCK_TILE (4 MiB; larger
    tiles fall out of cache). Measured on the 2-core CPU at 8192 tokens per step, 6 heads
    (docs/benchmarks.md): 64 at T=256, 128 at 1024 and 2048, 256 at 4096."""
    for block in AUTO_BLOCKS:
        if block * 4 <= seq_len and batch * n_heads * block * block <= AUTO_BLOCK_TILE:
            return block
    return AUTO_BLOCKS[-1]


def blocked_attention(q_BxKxGxTxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array, mask_BxTxS: Array | None,
                      sink_KxG: Array | None = None, block: int | None = None) -> Array:
    """`grouped_attention`'s result without the [T, S] scores: FlashAttention-2 on the CPU.

    Self-attention only (S == T, the training forward): query block i meets key blocks 0..i (the
    blocks above the causal diagonal are never computed), with an online softmax whose running
    max and sum start from the sink logit when there is one. The custom gradient keeps only the
    output and each row's logsumexp, and recomputes the scores block by block. T not a multiple of
    `block` is padded (padded keys sit above every real query's diagonal; padded queries are
    dropped). mask_BxTxS (packed rows) is read one [block, block] tile at a time. Memory: O(T * block)
    temporaries per layer instead of O(T * S). block None: `auto_block`. Returns out_BxKxGxTxH.
    """
    b, kh, g, t, _ = q_BxKxGxTxH.shape
    if block is None:
        block = auto_block(b, kh * g, t)
    if k_BxKxSxH.shape[2] != t:
        raise ValueError(f"blocked_attention is self-attention: {k_BxKxSxH.shape[2]} keys for {t} queries")
    block = min(block, t)
    tp = -(-t // block) * block
    q, k, v = (_pad_axis(x, x.ndim - 2, tp) for x in (q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH))
    if mask_BxTxS is not None:
        mask_BxTxS = _pad_axis(_pad_axis(mask_BxTxS, 1, tp, False), 2, tp, False)
    return _blocked(q, k, v, mask_BxTxS, sink_KxG, block)[:, :, :, :t]


def blocked_attention_btnh(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array | None,
                           sink_N: Array | None = None, block: int | None = None) -> Array:
    """`blocked_attention` on the [B, T, N, H] / [B, S, K, H] layout (as `einsum_attention`)."""
    kv = k_BxSxKxH.shape[2]
    sink_KxG = None if sink_N is None else sink_N.reshape(kv, -1)
    out = blocked_attention(to_grouped(q_BxTxNxH, kv), k_BxSxKxH.transpose(0, 2, 1, 3),
                            v_BxSxKxH.transpose(0, 2, 1, 3), mask_BxTxS, sink_KxG, block)
    return from_grouped(out)


# --------------------------------------------------------------------------- dense


@jax.custom_vjp
def _matmul_rowmajor_grad(x: Array, w_DxF: Array) -> Array:
    dt = jnp.result_type(x, w_DxF)
    return jax.lax.dot_general(x, w_DxF, (((x.ndim - 1,), (0,)), ((), ())), **_acc(x, w_DxF)).astype(dt)


def _matmul_fwd(x, w_DxF):
    return _matmul_rowmajor_grad(x, w_DxF), (x, w_DxF)


def _matmul_bwd(res, g):
    x, w_DxF = res
    dx = jax.lax.dot_general(g, w_DxF, (((g.ndim - 1,), (1,)), ((), ())), **_acc(g, w_DxF)).astype(x.dtype)
    # dW = x^T g. Left to itself XLA:CPU lays g out transposed ([F, B*T]) for this product, which
    # makes the op producing g (e.g. the SwiGLU backward) write with a stride; materialising x^T
    # (the smaller operand) behind a barrier keeps g row-major: 7-9% of a CPU training step.
    x_DxN = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    g_NxF = g.reshape(-1, g.shape[-1])
    dw = jnp.dot(x_DxN, g_NxF, **_acc(x_DxN, g_NxF)).astype(w_DxF.dtype)
    return dx, dw


_matmul_rowmajor_grad.defvjp(_matmul_fwd, _matmul_bwd)


def rowmajor_grad_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's dot_general, with the weight gradient computed as above (same values). Anything
    but a plain [.., D] x [D, F] product falls through to jax.lax.dot_general."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or rhs.ndim != 2 or precision is not None \
            or preferred_element_type is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    return _matmul_rowmajor_grad(lhs, rhs)


@jax.custom_vjp
def tied_logits(x_BxTxD: Array, embed_VxD: Array) -> Array:
    """The tied LM head x . E^T as float32 logits for 16-bit x and E: accumulated in f32 (`_acc`), and
    the backward's two products take the cotangent rounded to x's dtype, as bf16 autocast does. The
    model uses it for bf16/f16 compute on CPU; float32 keeps nn.Embed.attend."""
    return jax.lax.dot_general(x_BxTxD, embed_VxD, (((x_BxTxD.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _tied_fwd(x, e):
    return tied_logits(x, e), (x, e)


def _tied_bwd(res, g):
    x, e = res
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, e, (((g.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    g_NxV, x_NxD = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    de = jax.lax.dot_general(g_NxV, x_NxD, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), de.astype(e.dtype)


tied_logits.defvjp(_tied_fwd, _tied_bwd)


@jax.custom_vjp
def add_bias(y: Array, bias_F: Array) -> Array:
    """y + bias over the last axis, for 16-bit y: the bias gradient is a ones-vector product
    accumulated in f32 (`_acc`). Left to itself, XLA:CPU sums a bf16 gradient over the batch as a
    convert to f32 and an unfused, split `reduce-window`: 19% of a 111M GPT-2 bf16 step."""
    return y + bias_F


def _add_bias_fwd(y, bias_F):
    return y + bias_F, jnp.zeros((), bias_F.dtype)  # the residual: the bias's dtype


def _add_bias_bwd(like, g):
    g_NxF = g.reshape(-1, g.shape[-1])
    dbias = jnp.dot(jnp.ones((g_NxF.shape[0],), g.dtype), g_NxF, **_acc(g_NxF)).astype(like.dtype)
    return g, dbias


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)
