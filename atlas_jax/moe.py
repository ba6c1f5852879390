"""Mixture-of-experts routing and expert compute, as pure functions (the Flax layer is model.MoE).

Routing is Mixtral's (and llama.cpp's `llama` architecture's): softmax of the router logits over
all E experts in float32, the top k, their weights renormalised to sum to 1, and the output
sum_k w_k * SwiGLU_{e_k}(x). Every token is computed by its k experts: nothing is dropped.

Two implementations of the expert compute, the same math (tests/parity holds both to torch):

- `experts_ragged` ("ragged"): the N*K (token, expert) assignments sorted by expert and run as
  grouped matmuls, `jax.lax.ragged_dot` (what an accelerator runs as one grouped GEMM);
- `experts_dense` ("dense"): every expert over every token, the outputs weighted by the routing
  weights (zero for experts a token did not pick): E/K times the FLOPs, no sort or gather.

`model.moe_impl=auto` picks by backend (`moe_impl` in model.py) from the CPU measurement in
scripts/moe_bench.py.

Auxiliary losses (averaged over the MoE layers by the model, added to the loss with
`model.moe_aux_loss_coef` and `model.moe_z_loss_coef`):

- `load_balance_loss`: Switch Transformer's E * sum_e f_e * P_e, f_e the fraction of the N*K
  assignments that went to expert e, P_e the mean router probability of e. It is 1 at a perfectly
  balanced router, whatever k (Hugging Face's Mixtral `load_balancing_loss_func` is k times this).
- `router_z_loss`: ST-MoE's mean over tokens of logsumexp(router logits)^2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def route(logits_NxE: Array, k: int) -> tuple[Array, Array, Array]:
    """(weights_NxK float32 summing to 1 per token, experts_NxK int32, probs_NxE float32)."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    top_NxK, experts_NxK = jax.lax.top_k(probs_NxE, k)
    weights_NxK = top_NxK / jnp.sum(top_NxK, axis=-1, keepdims=True)
    return weights_NxK, experts_NxK.astype(jnp.int32), probs_NxE


def load_balance_loss(probs_NxE: Array, experts_NxK: Array) -> Array:
    """E * sum_e f_e * P_e (1.0 when balanced); f_e counts assignments, so only P_e carries a gradient."""
    n_experts = probs_NxE.shape[-1]
    counts_E = jnp.zeros((n_experts,), jnp.float32).at[experts_NxK.reshape(-1)].add(1.0)
    f_E = counts_E / experts_NxK.size
    p_E = jnp.mean(probs_NxE, axis=0)
    return n_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_NxE: Array) -> Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)))


def _swiglu(gate: Array, up: Array) -> Array:
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(up.dtype)


def _sort_by_expert(experts_NxK: Array, n_experts: int) -> tuple[Array, Array, Array, Array]:
    """The N*K assignments (token-major) sorted by expert: (order_A, rank_A: each sorted assignment's
    place in the sorted list of the token-major one, sizes_E, sorted expert ids)."""
    expert_A = experts_NxK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    rank_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0], dtype=order_A.dtype))
    sizes_E = jnp.zeros((n_experts,), jnp.int32).at[expert_A].add(1)
    return order_A, rank_A, sizes_E, expert_A[order_A]


def _combine(y_AxD: Array, weights_NxK: Array) -> Array:
    """Token-major y [N*K, D] -> sum_k w_k * y_k, in float32 -> out_NxD."""
    n, k = weights_NxK.shape
    return jnp.einsum("nkd,nk->nd", y_AxD.reshape(n, k, -1).astype(jnp.float32), weights_NxK)


def experts_ragged(x_NxD: Array, weights_NxK: Array, experts_NxK: Array,
                   w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array) -> Array:
    """sum_k w_k * SwiGLU_{e_k}(x): assignments sorted by expert, three `lax.ragged_dot`s -> out_NxD."""
    k = experts_NxK.shape[1]
    order_A, rank_A, sizes_E, _ = _sort_by_expert(experts_NxK, w_gate_ExDxF.shape[0])
    x_AxD = x_NxD[order_A // k]
    gate = jax.lax.ragged_dot(x_AxD, w_gate_ExDxF, sizes_E)
    up = jax.lax.ragged_dot(x_AxD, w_up_ExDxF, sizes_E)
    y_AxD = jax.lax.ragged_dot(_swiglu(gate, up), w_down_ExFxD, sizes_E)
    return _combine(y_AxD[rank_A], weights_NxK).astype(x_NxD.dtype)


def grouped_block(n_assignments: int, n_experts: int) -> int:
    """Rows per block: the power of two at or below the mean group size, in [8, 128]. Padding costs
    at most E*(block-1) rows; fewer, bigger blocks gather fewer weight copies. On 2 CPU cores
    (scripts/moe_bench.py, E=8 k=2 D=192 F=512, N=512) blocks of 32/64/128 took 110/79/56 ms."""
    mean = max(n_assignments // n_experts, 1)
    return int(min(max(1 << (mean.bit_length() - 1), 8), 128))


def experts_grouped(x_NxD: Array, weights_NxK: Array, experts_NxK: Array,
                    w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array, block: int | None = None) -> Array:
    """sum_k w_k * SwiGLU_{e_k}(x) as block-grouped matmuls: each expert's sorted assignments are
    padded to a multiple of `block` rows, so every block of rows belongs to one expert and the
    product is a batched matmul of [block, D] blocks with their expert's gathered weights (at most
    N*K/block + E blocks, a static bound; spare blocks hold zeros) -> out_NxD."""
    n, k = experts_NxK.shape
    n_experts, d = w_gate_ExDxF.shape[:2]
    a = n * k
    block = block or grouped_block(a, n_experts)
    order_A, rank_A, sizes_E, sorted_expert_A = _sort_by_expert(experts_NxK, n_experts)
    padded_E = (sizes_E + block - 1) // block * block
    padded_end_E = jnp.cumsum(padded_E)
    group_start_E = jnp.cumsum(sizes_E) - sizes_E
    # The padded row of each sorted assignment: its expert's padded start + its rank in the group.
    row_sorted_A = (padded_end_E - padded_E)[sorted_expert_A] + jnp.arange(a) - group_start_E[sorted_expert_A]
    n_blocks = min((a + n_experts * (block - 1)) // block, n_experts * -(-a // block))
    # Each padded row's source token (n: the zero row appended below), each block's expert.
    source_R = jnp.full((n_blocks * block,), n, jnp.int32).at[row_sorted_A].set((order_A // k).astype(jnp.int32))
    expert_B = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_blocks) * block, side="right"), n_experts - 1)
    x_BxbxD = jnp.concatenate([x_NxD, jnp.zeros((1, d), x_NxD.dtype)])[source_R].reshape(n_blocks, block, d)
    gate = jnp.einsum("bnd,bdf->bnf", x_BxbxD, w_gate_ExDxF[expert_B])
    up = jnp.einsum("bnd,bdf->bnf", x_BxbxD, w_up_ExDxF[expert_B])
    y_BxbxD = jnp.einsum("bnf,bfd->bnd", _swiglu(gate, up), w_down_ExFxD[expert_B])
    y_AxD = y_BxbxD.reshape(n_blocks * block, d)[row_sorted_A[rank_A]]
    return _combine(y_AxD, weights_NxK).astype(x_NxD.dtype)


def experts_dense(x_NxD: Array, weights_NxK: Array, experts_NxK: Array,
                  w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array) -> Array:
    """sum_k w_k * SwiGLU_{e_k}(x): every expert over every token, combined with zero weight for the
    experts a token did not pick -> out_NxD."""
    n_experts = w_gate_ExDxF.shape[0]
    combine_NxE = jnp.sum(jax.nn.one_hot(experts_NxK, n_experts, dtype=jnp.float32) * weights_NxK[..., None], axis=1)
    gate = jnp.einsum("nd,edf->enf", x_NxD, w_gate_ExDxF)
    up = jnp.einsum("nd,edf->enf", x_NxD, w_up_ExDxF)
    y_ExNxD = jnp.einsum("enf,efd->end", _swiglu(gate, up), w_down_ExFxD)
    return jnp.einsum("end,ne->nd", y_ExNxD.astype(jnp.float32), combine_NxE).astype(x_NxD.dtype)


EXPERT_IMPLS = {"ragged": experts_ragged, "grouped": experts_grouped, "dense": experts_dense}
