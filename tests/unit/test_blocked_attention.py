"""kernels.blocked_attention (model.attention=blocked) against the grouped einsums it replaces:
outputs and gradients on MHA, GQA, T not a multiple of the block, sink logits and packed rows; its
compiled temporaries grow linearly in T where the einsums' grow quadratically. (Against torch:
tests/parity/test_model_parity.py, the blocked case.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.kernels import AUTO_BLOCK_TILE, auto_block, blocked_attention, grouped_attention
from atlas_jax.model import segment_mask

TOL = 1e-5


def _inputs(b, kv, g, t, h, sinks, packed, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, kv, g, t, h))
    k = jax.random.normal(ks[1], (b, kv, t, h))
    v = jax.random.normal(ks[2], (b, kv, t, h))
    sink_KxG = jax.random.normal(ks[3], (kv, g)) if sinks else None
    mask_BxTxS = None
    if packed:  # segments of random lengths, as data.pack makes them
        mask_BxTxS = segment_mask(jnp.cumsum(jax.random.bernoulli(ks[4], 0.1, (b, t)), axis=1))
    w = jax.random.normal(ks[5], (b, kv, g, t, h))  # a loss that weighs every output differently
    return (q, k, v, sink_KxG), mask_BxTxS, w


def _value_and_grads(kernel, args, mask_BxTxS, w):
    def loss(q, k, v, sink):
        return jnp.sum(kernel(q, k, v, mask_BxTxS, sink) * w)

    argnums = (0, 1, 2, 3) if args[3] is not None else (0, 1, 2)
    out = jax.jit(lambda *a: kernel(*a[:3], mask_BxTxS, a[3]))(*args)
    return out, jax.jit(jax.grad(loss, argnums))(*args)


@pytest.mark.parametrize("b, kv, g, t, h, block, sinks, packed", [
    (2, 4, 1, 64, 16, 16, False, False),   # MHA, T a multiple of the block
    (2, 2, 3, 64, 16, 16, False, False),   # GQA
    (1, 2, 2, 50, 8, 16, False, False),    # T not a multiple of the block (padded)
    (2, 2, 3, 40, 16, 64, False, False),   # one block, bigger than T
    (2, 2, 3, 50, 16, 16, True, False),    # sink logits
    (2, 2, 3, 50, 16, 16, False, True),    # packed rows
    (2, 1, 4, 50, 16, 16, True, True),     # both
    (1, 2, 3, 300, 8, None, True, True),   # the automatic block (64 here: five blocks, the last padded)
])
def test_blocked_attention_outputs_and_grads_match_einsum(b, kv, g, t, h, block, sinks, packed):
    args, mask, w = _inputs(b, kv, g, t, h, sinks, packed)
    want_out, want_grads = _value_and_grads(grouped_attention, args, mask, w)
    got_out, got_grads = _value_and_grads(
        lambda q, k, v, m, s: blocked_attention(q, k, v, m, s, block), args, mask, w)
    names = ["out", "dq", "dk", "dv", "dsink"]
    for name, got, want in zip(names, (got_out, *got_grads), (want_out, *want_grads)):
        err = np.abs(np.asarray(got) - np.asarray(want))
        at = np.unravel_index(err.argmax(), err.shape)
        assert err.max() <= TOL * max(1.0, float(np.abs(want).max())), \
            f"{name}: blocked vs einsum differ by {err.max():.3g} at {at} (scale {np.abs(want).max():.3g})"


@pytest.mark.parametrize("batch, heads, seq, want", [
    (32, 6, 256, 64),    # 4 blocks of 64 along T=256
    (8, 6, 1024, 128),   # 256 would make an 8*6*256^2 = 3.1M-float tile
    (4, 6, 2048, 128),
    (2, 6, 4096, 256),
    (1, 6, 7, 64),       # shorter than every block: 64 (blocked_attention clips it to T)
    (64, 32, 4096, 64),  # a wide batch: even 64 exceeds the tile, the smallest block is the floor
])
def test_auto_block_picks_the_largest_block_with_four_blocks_along_t_and_a_tile_in_budget(batch, heads, seq, want):
    got = auto_block(batch, heads, seq)
    assert got == want, f"auto_block({batch}, {heads}, {seq}) = {got}, want {want}"
    if seq >= 4 * want and want < 256:  # the next block up breaks one of the two rules
        up = 2 * want
        assert 4 * up > seq or batch * heads * up * up > AUTO_BLOCK_TILE


def _attention_grad_temp_bytes(kernel, t: int) -> int:
    """Temporaries of the compiled value-and-grad of one attention at the shakespeare width
    (2 kv heads x 3 query heads of 32), batch 1: what XLA allocates besides inputs and outputs."""
    q = jax.ShapeDtypeStruct((1, 2, 3, t, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 2, t, 32), jnp.float32)
    f = jax.value_and_grad(lambda q, k, v: jnp.sum(kernel(q, k, v, None)), (0, 1, 2))
    return jax.jit(f).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


def test_blocked_attention_temporaries_grow_linearly_in_t_where_einsums_grow_quadratically():
    blocked = {t: _attention_grad_temp_bytes(lambda q, k, v, m: blocked_attention(q, k, v, m), t)
               for t in (1024, 2048)}
    einsum = {t: _attention_grad_temp_bytes(grouped_attention, t) for t in (1024, 2048)}
    ratio, einsum_ratio = blocked[2048] / blocked[1024], einsum[2048] / einsum[1024]
    assert ratio < 2.6, f"blocked temporaries x{ratio:.2f} from T=1024 to 2048 ({blocked}); linear is ~2"
    assert einsum_ratio > 3.4, f"einsum temporaries x{einsum_ratio:.2f} ({einsum}): expected ~4 (the [T, S] scores)"
    assert blocked[2048] < einsum[2048] / 8, f"blocked {blocked[2048]} bytes vs einsum {einsum[2048]} at T=2048"
