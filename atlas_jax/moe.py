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

Expert parallelism (`experts_all_to_all`, a train.mesh expert axis > 1): each device routes its own
tokens, sends every assignment's hidden state to the device holding its expert by all_to_all, runs
its E/P experts over what it received (`EXPERT_ROWS`, the same implementations over rows) and sends
the outputs back. Dropless by default (buffers sized for the worst case: P times each device's
assignments); `model.moe_capacity_factor` bounds them as Switch/GShard do and drops the overflow.

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


def rows_grouped(x_SxD: Array, source_R: Array, expert_R: Array,
                 w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array, block: int | None = None) -> Array:
    """SwiGLU_{expert_R[r]}(x_SxD[source_R[r]]) for each of R rows, as block-grouped matmuls: the rows
    sorted by expert and each expert's rows padded to a multiple of `block`, so every block of rows
    belongs to one expert and the product is a batched matmul of [block, D] blocks with their
    expert's gathered weights (at most R/block + E blocks, a static bound; spare blocks hold zeros).
    A row whose expert is E (out of range) is not computed and comes back as zeros -> y_RxD."""
    r = expert_R.shape[0]
    n_experts, d = w_gate_ExDxF.shape[:2]
    s = x_SxD.shape[0]
    block = block or grouped_block(r, n_experts)
    order_R = jnp.argsort(expert_R, stable=True)
    rank_R = jnp.zeros_like(order_R).at[order_R].set(jnp.arange(r, dtype=order_R.dtype))
    sorted_expert_R = expert_R[order_R]
    sizes_E = jnp.zeros((n_experts,), jnp.int32).at[expert_R].add(1, mode="drop")
    padded_E = (sizes_E + block - 1) // block * block
    padded_end_E = jnp.cumsum(padded_E)
    group_start_E = jnp.cumsum(sizes_E) - sizes_E
    n_blocks = min((r + n_experts * (block - 1)) // block, n_experts * -(-r // block))
    # The padded row of each sorted row: its expert's padded start + its rank in the group; rows of
    # expert E go to the zero row past the blocks.
    valid_R = sorted_expert_R < n_experts
    e_R = jnp.minimum(sorted_expert_R, n_experts - 1)
    row_sorted_R = jnp.where(valid_R, (padded_end_E - padded_E)[e_R] + jnp.arange(r) - group_start_E[e_R],
                             n_blocks * block)
    # Each padded row's source (s: the zero row appended below), each block's expert.
    source_P = jnp.full((n_blocks * block,), s, jnp.int32).at[row_sorted_R].set(
        source_R[order_R].astype(jnp.int32), mode="drop")
    expert_B = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_blocks) * block, side="right"), n_experts - 1)
    x_BxbxD = jnp.concatenate([x_SxD, jnp.zeros((1, d), x_SxD.dtype)])[source_P].reshape(n_blocks, block, d)
    gate = jnp.einsum("bnd,bdf->bnf", x_BxbxD, w_gate_ExDxF[expert_B])
    up = jnp.einsum("bnd,bdf->bnf", x_BxbxD, w_up_ExDxF[expert_B])
    y_BxbxD = jnp.einsum("bnf,bfd->bnd", _swiglu(gate, up), w_down_ExFxD[expert_B])
    y_PxD = jnp.concatenate([y_BxbxD.reshape(n_blocks * block, d), jnp.zeros((1, d), y_BxbxD.dtype)])
    return y_PxD[row_sorted_R[rank_R]]


def experts_grouped(x_NxD: Array, weights_NxK: Array, experts_NxK: Array,
                    w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array, block: int | None = None) -> Array:
    """sum_k w_k * SwiGLU_{e_k}(x) with the N*K (token, expert) assignments as `rows_grouped` rows -> out_NxD."""
    n, k = experts_NxK.shape
    source_A = jnp.arange(n * k, dtype=jnp.int32) // k
    y_AxD = rows_grouped(x_NxD, source_A, experts_NxK.reshape(-1), w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, block)
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


def rows_ragged(x_SxD: Array, source_R: Array, expert_R: Array,
                w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array) -> Array:
    """`rows_grouped`'s rows as three `lax.ragged_dot`s over the rows sorted by expert; rows of expert E
    (out of range) sort last, outside every group, and come back as zeros -> y_RxD."""
    n_experts = w_gate_ExDxF.shape[0]
    order_R = jnp.argsort(expert_R, stable=True)
    rank_R = jnp.zeros_like(order_R).at[order_R].set(jnp.arange(order_R.shape[0], dtype=order_R.dtype))
    sizes_E = jnp.zeros((n_experts,), jnp.int32).at[expert_R].add(1, mode="drop")
    x_RxD = x_SxD[source_R[order_R]]
    gate = jax.lax.ragged_dot(x_RxD, w_gate_ExDxF, sizes_E)
    up = jax.lax.ragged_dot(x_RxD, w_up_ExDxF, sizes_E)
    y_RxD = jax.lax.ragged_dot(_swiglu(gate, up), w_down_ExFxD, sizes_E)
    return jnp.where((expert_R < n_experts)[:, None], y_RxD[rank_R], 0)


def rows_dense(x_SxD: Array, source_R: Array, expert_R: Array,
               w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array) -> Array:
    """`rows_grouped`'s rows with every expert over every row, each row keeping its own expert's
    output (none for expert E) -> y_RxD."""
    n_experts = w_gate_ExDxF.shape[0]
    x_RxD = x_SxD[source_R]
    gate = jnp.einsum("rd,edf->erf", x_RxD, w_gate_ExDxF)
    up = jnp.einsum("rd,edf->erf", x_RxD, w_up_ExDxF)
    y_ExRxD = jnp.einsum("erf,efd->erd", _swiglu(gate, up), w_down_ExFxD)
    pick_RxE = jax.nn.one_hot(expert_R, n_experts, dtype=y_ExRxD.dtype)
    return jnp.einsum("erd,re->rd", y_ExRxD, pick_RxE)


EXPERT_ROWS = {"ragged": rows_ragged, "grouped": rows_grouped, "dense": rows_dense}


def experts_all_to_all(x_NxD: Array, weights_NxK: Array, experts_NxK: Array,
                       w_gate_ExDxF: Array, w_up_ExDxF: Array, w_down_ExFxD: Array, impl: str,
                       axis: str = "expert", capacity: int | None = None) -> tuple[Array, Array]:
    """Expert parallelism, run per device inside a shard_map over the mesh axis `axis` (size P): this
    device's N tokens, their routing over all E experts, and its own E/P experts (w_* [E/P, ...];
    device j holds experts j*E/P ... (j+1)*E/P - 1).

    Each of the N*K assignments goes to the device holding its expert: the assignments are sorted by
    expert and packed into a [P, C, D] send buffer (row p for device p), one `all_to_all` delivers
    them, the device runs its experts over the [P*C] received rows (`EXPERT_ROWS[impl]`), a second
    `all_to_all` returns the outputs to the tokens' devices, which combine them with the routing
    weights. C = capacity (per pair of devices); None is dropless (C = N*K: every assignment fits,
    however unbalanced the router). Assignments past C are dropped (they add nothing; the token
    keeps its residual), lowest expert ids first in each device's share, then token order.
    -> (out_NxD, the number of dropped assignments on this device)."""
    n_dev = jax.lax.axis_size(axis)
    n, k = experts_NxK.shape
    d = x_NxD.shape[-1]
    a = n * k
    local = w_gate_ExDxF.shape[0]
    c = a if capacity is None else capacity
    expert_A = experts_NxK.reshape(-1)
    dest_A = expert_A // local
    order_A = jnp.argsort(expert_A, stable=True)
    counts_P = jnp.zeros((n_dev,), jnp.int32).at[dest_A].add(1)
    start_P = jnp.cumsum(counts_P) - counts_P
    pos_A = jnp.zeros((a,), jnp.int32).at[order_A].set(
        jnp.arange(a, dtype=jnp.int32) - start_P[dest_A[order_A]])
    send_x = jnp.zeros((n_dev, c, d), x_NxD.dtype).at[dest_A, pos_A].set(
        x_NxD[jnp.arange(a) // k], mode="drop")
    send_e = jnp.full((n_dev, c), local, jnp.int32).at[dest_A, pos_A].set(expert_A % local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0)
    rows = n_dev * c
    y_RxD = EXPERT_ROWS[impl](recv_x.reshape(rows, d), jnp.arange(rows), recv_e.reshape(rows),
                              w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    back = jax.lax.all_to_all(y_RxD.reshape(n_dev, c, d), axis, 0, 0)
    kept_A = pos_A < c
    y_AxD = jnp.where(kept_A[:, None], back[dest_A, jnp.minimum(pos_A, c - 1)], 0)
    return _combine(y_AxD, weights_NxK).astype(x_NxD.dtype), jnp.sum(~kept_A)


EXPERT_IMPLS = {"ragged": experts_ragged, "grouped": experts_grouped, "dense": experts_dense}
