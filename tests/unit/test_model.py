"""atlas_jax.model on its own: the param tree, shapes, causal masks, the kernel choice (attention,
matmul) and the CPU kernels of atlas_jax.kernels against their plain counterparts, RoPE, parameter and
FLOP counts, and left-padded batched decoding. (Agreement with the PyTorch reference is in tests/parity.)"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_jax import model as M
from atlas_jax.config import ModelConfig, resolve_model
from atlas_jax.kernels import einsum_attention, rowmajor_grad_dot_general, tied_logits

V, D, H, KV, MAX_T = 97, 64, 4, 2, 16


def tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=H, n_kv_heads=KV, max_seq_len=MAX_T)
    return resolve_model(ModelConfig(**{**fields, **overrides}))


def o1_params(cfg: ModelConfig, seed: int = 0):
    """init_params with kernels and embeddings x10: attention scores and logits of order 1, so a
    wrong mask or a padding leak moves logits far past the tolerances below (std 0.02 would not)."""
    params = M.init_params(cfg, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 10.0 if path[-1].key in ("kernel", "embedding") else x, params)


def shapes_by_path(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}


# --------------------------------------------------------------------------- param tree and shapes


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)])
def test_param_tree_matches_the_documented_paths_and_shapes(arch, tied):
    cfg = tiny(arch=arch, tie_embeddings=tied)
    dh, f, kv = cfg.head_dim, cfg.d_ff, cfg.n_kv_heads
    want = {"embed/embedding": (V, D), "final_norm/scale": (D,)}
    if arch == "gpt2":
        want |= {"pos_embed/embedding": (MAX_T, D), "final_norm/bias": (D,)}
    if not tied:
        want["lm_head/kernel"] = (D, V)
    for i in range(cfg.n_layers):
        p = f"layers_{i}"
        want |= {f"{p}/attn_norm/scale": (D,), f"{p}/mlp_norm/scale": (D,),
                 f"{p}/attn/wq/kernel": (D, H * dh), f"{p}/attn/wk/kernel": (D, kv * dh),
                 f"{p}/attn/wv/kernel": (D, kv * dh), f"{p}/attn/wo/kernel": (H * dh, D),
                 f"{p}/mlp/w_up/kernel": (D, f), f"{p}/mlp/w_down/kernel": (f, D)}
        if arch == "llama":
            want[f"{p}/mlp/w_gate/kernel"] = (D, f)
        else:
            want |= {f"{p}/attn_norm/bias": (D,), f"{p}/mlp_norm/bias": (D,), f"{p}/attn/wq/bias": (H * dh,),
                     f"{p}/attn/wk/bias": (kv * dh,), f"{p}/attn/wv/bias": (kv * dh,),
                     f"{p}/attn/wo/bias": (D,), f"{p}/mlp/w_up/bias": (f,), f"{p}/mlp/w_down/bias": (D,)}
    got = shapes_by_path(jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0))))
    assert got == want, f"extra: {sorted(set(got) - set(want))}, missing: {sorted(set(want) - set(got))}"


@pytest.mark.parametrize("arch, compute_dtype", [("llama", "bfloat16"), ("gpt2", "float32")])
def test_forward_gives_float32_logits_BxTxV(arch, compute_dtype):
    cfg = tiny(arch=arch, compute_dtype=compute_dtype)
    forward = jax.jit(lambda p, x: M.Transformer(cfg).apply({"params": p}, x))
    logits = forward(M.init_params(cfg, jax.random.key(0)), jnp.zeros((3, 7), jnp.int32))
    assert logits.shape == (3, 7, V) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_forward_rejects_sequences_longer_than_max_seq_len():
    cfg = tiny(arch="gpt2")  # its position table has max_seq_len rows
    with pytest.raises(ValueError, match="max_seq_len"):
        M.Transformer(cfg).apply({"params": M.init_params(cfg, jax.random.key(0))}, jnp.zeros((1, MAX_T + 1), jnp.int32))


def test_init_cache_shapes_and_decode_advances_the_index():
    cfg = tiny(compute_dtype="bfloat16")
    cache = M.init_cache(cfg, batch=2, max_len=12)
    assert len(cache["layers"]) == cfg.n_layers
    assert all(kv["k"].shape == kv["v"].shape == (2 * KV, 12, cfg.head_dim) and kv["k"].dtype == jnp.bfloat16
               for kv in cache["layers"])
    assert cache["pos"].shape == (2, 12) and bool(jnp.all(cache["pos"] == -1)) and int(cache["index"]) == 0
    params = M.init_params(cfg, jax.random.key(0))
    tokens = jnp.ones((2, 5), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    decode = jax.jit(lambda p, x, pos, c: M.Transformer(cfg).apply({"params": p}, x, pos, c, method=M.Transformer.decode))
    logits, cache = decode(params, tokens, positions, cache)
    assert logits.shape == (2, 5, V) and logits.dtype == jnp.float32 and int(cache["index"]) == 5
    assert cache["pos"][0].tolist() == [0, 1, 2, 3, 4] + [-1] * 7


# --------------------------------------------------------------------------- causal attention


@pytest.mark.parametrize("impl", ["xla", "einsum", "blocked"])
def test_attention_is_causal_and_groups_query_heads_by_h_div_group(impl):
    b, t, n, kv, h = 2, 6, 4, 2, 8
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(0), 3), [(b, t, n, h), (b, t, kv, h), (b, t, kv, h)]))
    attention = jax.jit(lambda q, k, v: M.attention(q, k, v, impl, block=4))  # blocked: 2 blocks, 1 padded
    out = attention(q, k, v)
    # Position 0 sees only itself: query head i outputs v of kv head i // (n / kv).
    np.testing.assert_allclose(out[:, 0], v[:, 0, np.arange(n) // (n // kv)], atol=1e-6)
    for s in range(1, t):  # keys and values after s never reach outputs at or before s
        k2, v2 = k.at[:, s:].add(3.0), v.at[:, s:].add(3.0)
        out2 = attention(q, k2, v2)
        assert bool(jnp.all(out2[:, :s] == out[:, :s])), f"{impl}: output before {s} changed with later keys"
        assert not bool(jnp.all(out2[:, s] == out[:, s]))


def test_explicit_causal_mask_equals_is_causal():
    q, k, v = (jax.random.normal(key, (2, 5, 4, 8)) for key in jax.random.split(jax.random.key(1), 3))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (2, 5, 5))
    for impl in ("xla", "einsum"):
        np.testing.assert_allclose(einsum_attention(q, k, v, mask), M.attention(q, k, v, impl), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rowmajor_grad_dense_matches_plain_dot_general(dtype):
    """The Dense matmul with the CPU weight-gradient path: same value, same gradients as lax.dot_general."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (3, 7, 24)).astype(dtype)
    w = jax.random.normal(kw, (24, 40)).astype(dtype)
    g = jax.random.normal(kg, (3, 7, 40)).astype(dtype)
    dims = (((2,), (0,)), ((), ()))
    plain = lambda x, w: jnp.sum(jax.lax.dot_general(x, w, dims).astype(jnp.float32) * g)  # noqa: E731
    fast = lambda x, w: jnp.sum(rowmajor_grad_dot_general(x, w, dims).astype(jnp.float32) * g)  # noqa: E731
    (v0, (dx0, dw0)), (v1, (dx1, dw1)) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w) for f in (plain, fast))
    tol = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(v1, v0, rtol=tol)
    assert dx1.dtype == dx0.dtype == x.dtype and dw1.dtype == dw0.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(dx1, np.float32), np.asarray(dx0, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dw1, np.float32), np.asarray(dw0, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rowmajor_dense_matches_nn_dense_with_its_bias_gradient(dtype):
    """model.RowMajorDense (the CPU Dense: kernels.add_bias for 16-bit outputs) against nn.Dense on the
    same params: value and the kernel, bias and input gradients."""
    kx, kg = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (3, 7, 24))
    g = jax.random.normal(kg, (3, 7, 40))
    kw = dict(features=40, dtype=jnp.dtype(dtype), kernel_init=nn.initializers.normal(0.5),
              bias_init=nn.initializers.normal(0.5))
    fast, plain = M.RowMajorDense(**kw), nn.Dense(**kw)
    params = plain.init(jax.random.key(6), x)
    assert jax.tree.structure(fast.init(jax.random.key(6), x)) == jax.tree.structure(params)
    loss = lambda mod: lambda p, x: jnp.sum(mod.apply(p, x).astype(jnp.float32) * g)  # noqa: E731
    (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(loss(m), argnums=(0, 1)))(params, x) for m in (plain, fast))
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(float(v1), float(v0), rtol=tol)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), f"{jax.tree_util.keystr(path)} differs"


def test_tied_logits_match_the_f32_product_and_its_gradients_in_bf16():
    """The tied head for 16-bit compute (kernels.tied_logits, f32 accumulation): float32 logits, and
    value and gradients within bf16 rounding of the same product computed in float32."""
    kx, ke, kg = jax.random.split(jax.random.key(4), 3)
    x32, e32 = jax.random.normal(kx, (3, 7, 64)), jax.random.normal(ke, (50, 64)) * 0.1
    g = jax.random.normal(kg, (3, 7, 50))
    x, e = x32.astype(jnp.bfloat16), e32.astype(jnp.bfloat16)
    assert tied_logits(x, e).dtype == jnp.float32
    plain = lambda x, e: jnp.sum(jnp.einsum("btd,vd->btv", x.astype(jnp.float32), e.astype(jnp.float32)) * g)  # noqa: E731
    fast = lambda x, e: jnp.sum(tied_logits(x, e) * g)  # noqa: E731
    (v0, (dx0, de0)), (v1, (dx1, de1)) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, e) for f in (plain, fast))
    assert dx1.dtype == x.dtype and de1.dtype == e.dtype
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)  # same bf16 inputs, f32 accumulation
    for got, want in ((dx1, dx0), (de1, de0)):  # the cotangent is rounded to bf16 first, as autocast does
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


ON_GPU = jax.default_backend() == "gpu"
ON_CPU = jax.default_backend() == "cpu"


def test_auto_attention_picks_the_kernel_of_the_backend():
    # GPU: cuDNN's fused kernel in bf16 (it takes no float32), XLA's in float32; elsewhere the grouped einsums.
    assert M.attention_impl(tiny()) == ("xla" if ON_GPU else "einsum")
    assert M.attention_impl(tiny(compute_dtype="bfloat16")) == ("cudnn" if ON_GPU else "einsum")
    # CPU: the blocked kernel from BLOCKED_MIN_SEQ query tokens on, the grouped einsums below it.
    n = M.BLOCKED_MIN_SEQ
    assert M.attention_impl(tiny(), n - 1) == ("xla" if ON_GPU else "einsum")
    assert M.attention_impl(tiny(), n) == ("xla" if ON_GPU else "blocked")
    for impl in ("xla", "einsum", "blocked"):
        assert M.attention_impl(tiny(attention=impl)) == impl
        assert M.attention_impl(tiny(attention=impl), n) == impl
    assert M.attention_impl(tiny(attention="cudnn", compute_dtype="bfloat16")) == "cudnn"


def test_auto_matmul_is_rowmajor_only_on_cpu_without_remat():
    assert M.matmul_impl(tiny()) == ("rowmajor" if ON_CPU else "xla")
    for remat in ("full", "dots"):  # a remat policy must see plain dot_generals
        assert M.matmul_impl(tiny(remat=remat)) == "xla"
    assert M.matmul_impl(tiny(matmul="xla")) == "xla"
    assert M.matmul_impl(tiny(matmul="rowmajor")) == "rowmajor"


@pytest.mark.parametrize("arch, tied", [("llama", False), ("gpt2", True)])
def test_rowmajor_and_xla_matmul_give_the_same_loss_and_grads(arch, tied):
    """model.matmul only changes how weight gradients are laid out: the loss and every gradient agree
    to 1e-6 (absolute, with O(1) activations) between the two paths."""
    # attention=xla: the only custom gradient left is the row-major matmul's, so the guard below can see it.
    cfg_row, cfg_xla = (tiny(arch=arch, tie_embeddings=tied, n_layers=1, attention="xla", matmul=m)
                        for m in ("rowmajor", "xla"))
    params = o1_params(cfg_row)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, V, (3, 11), dtype=np.int32) for _ in range(2))
    uses_custom_vjp = [("custom_vjp" in str(jax.make_jaxpr(lambda p, c=c: M.loss_fn(p, c, x, y))(params)))
                       for c in (cfg_row, cfg_xla)]
    assert uses_custom_vjp == [True, False], f"the two configs do not take different matmul paths: {uses_custom_vjp}"
    (l_row, g_row), (l_xla, g_xla) = (jax.jit(jax.value_and_grad(lambda p, c=c: M.loss_fn(p, c, x, y)))(params)
                                      for c in (cfg_row, cfg_xla))
    assert abs(float(l_row) - float(l_xla)) <= 1e-6, f"loss rowmajor {float(l_row)} vs xla {float(l_xla)}"
    flat_xla = dict(jax.tree_util.tree_flatten_with_path(g_xla)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(g_row)[0]:
        err = float(jnp.abs(g - flat_xla[path]).max())
        assert err <= 1e-6, f"{jax.tree_util.keystr(path)}: rowmajor vs xla gradient max |Δ| {err:.3g} > 1e-6"


# --------------------------------------------------------------------------- rope


@functools.partial(jax.jit, static_argnums=2)
def _rope_1(x_H, position, theta):
    return M.apply_rope(x_H[None, None, None], jnp.reshape(position, (1, 1)), theta)[0, 0, 0]


def rope_at(x_H: np.ndarray, position: int, theta: float = 10000.0) -> np.ndarray:
    """One head vector rotated to `position`, through M.apply_rope."""
    return np.asarray(_rope_1(jnp.asarray(x_H, jnp.float32), jnp.int32(position), theta), np.float64)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 60), n=st.integers(0, 60), shift=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_rope_dot_product_depends_only_on_relative_position(m, n, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=32), rng.normal(size=32)
    a = rope_at(q, m) @ rope_at(k, n)
    b = rope_at(q, m + shift) @ rope_at(k, n + shift)
    assert abs(a - b) <= 1e-4 * np.linalg.norm(q) * np.linalg.norm(k), f"q·k at ({m},{n}) {a} vs shifted by {shift} {b}"


@settings(max_examples=15, deadline=None)
@given(position=st.integers(0, 10_000), seed=st.integers(0, 2**16))
def test_rope_preserves_the_norm_of_every_adjacent_pair(position, seed):
    x = np.random.default_rng(seed).normal(size=16)
    y = rope_at(x, position)
    np.testing.assert_allclose(np.hypot(y[0::2], y[1::2]), np.hypot(x[0::2], x[1::2]), rtol=1e-5)


def test_rope_rotates_adjacent_pairs_by_position_times_theta_pow_minus_2i_over_dh():
    h, theta, p = 8, 10000.0, 3
    np.testing.assert_allclose(M.rope_frequencies(h, theta), theta ** (-np.arange(0, h, 2) / h), rtol=1e-12)
    for i in range(h // 2):
        x = np.zeros(h)
        x[2 * i] = 1.0  # the pair (2i, 2i+1), not (i, i + h/2)
        want = np.zeros(h)
        angle = p * theta ** (-2 * i / h)
        want[2 * i], want[2 * i + 1] = np.cos(angle), np.sin(angle)
        np.testing.assert_allclose(rope_at(x, p, theta), want, atol=1e-6, err_msg=f"pair {i}")
    x = np.random.default_rng(0).normal(size=h)
    np.testing.assert_allclose(rope_at(x, 0), x, atol=1e-7)  # position 0 is the identity


# --------------------------------------------------------------------------- counts


def gpt2_small() -> ModelConfig:
    return resolve_model(ModelConfig(arch="gpt2", vocab_size=50257, max_seq_len=1024, n_layers=12,
                                     d_model=768, n_heads=12, tie_embeddings=True))


def test_gpt2_small_has_124439808_parameters():
    counts = M.count_params_from_config(gpt2_small())
    # GPT-2 small; non-embedding excludes the 50257x768 token and 1024x768 position tables.
    non_embedding = 124_439_808 - 50257 * 768 - 1024 * 768
    assert counts == {"total": 124_439_808, "non_embedding": non_embedding, "active": 124_439_808,
                      "active_non_embedding": non_embedding}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_llama_parameter_count_matches_closed_form(n_kv_heads, tied):
    cfg = tiny(n_kv_heads=n_kv_heads, tie_embeddings=tied)
    dh, f = cfg.head_dim, cfg.d_ff
    per_layer = 2 * D + D * H * dh + 2 * D * n_kv_heads * dh + H * dh * D + 3 * D * f
    total = V * D * (1 if tied else 2) + cfg.n_layers * per_layer + D
    assert M.count_params_from_config(cfg) == {"total": total, "non_embedding": total - V * D, "active": total,
                                               "active_non_embedding": total - V * D}
    assert M.count_params(M.init_params(cfg, jax.random.key(0)))["total"] == total


def test_flops_per_token_of_gpt2_small_is_nanogpts_6n_plus_12lht():
    # nanoGPT's estimate_mfu for GPT-2 small at T=1024: N = params without the position table.
    n = 124_439_808 - 1024 * 768
    assert M.flops_per_token(gpt2_small(), 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_flops_per_token_is_6n_plus_12_l_d_t():
    cfg = tiny()
    assert M.flops_per_token(cfg, 2 * MAX_T) - M.flops_per_token(cfg, MAX_T) == 12 * cfg.n_layers * D * MAX_T
    # A tied llama has no position table: every parameter is in a matmul (or a norm), so 6N + 12LDT.
    assert M.flops_per_token(cfg, MAX_T) == 6 * M.count_params_from_config(cfg)["total"] + 12 * cfg.n_layers * D * MAX_T


def test_flops_per_token_is_the_same_for_tied_and_untied_heads():
    # The head's matmul costs the same whether its matrix is shared with the embedding or not.
    assert M.flops_per_token(tiny(tie_embeddings=False), MAX_T) == M.flops_per_token(tiny(tie_embeddings=True), MAX_T)


# --------------------------------------------------------------------------- padded decode


@pytest.mark.parametrize("attention", ["xla", "einsum", "blocked"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batched_decode_gives_each_row_its_unpadded_logits(arch, attention):
    """Prompts of length 5 and 3 in one batch (the short one left-padded, positions -1), prefilled
    together then decoded 4 tokens: every real position's logits equal those of the row alone."""
    cfg = tiny(arch=arch, attention=attention)
    model, params = M.Transformer(cfg), o1_params(cfg)
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, V, 5 + 4), rng.integers(1, V, 3 + 4)]  # prompt + 4 continuation tokens
    lengths, width, steps = [5, 3], 5, 4
    tokens = np.zeros((2, width), np.int32)  # pad id 0
    positions = np.full((2, width), -1, np.int32)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        tokens[r, width - n:], positions[r, width - n:] = row[:n], np.arange(n)
    decode = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c, method=M.Transformer.decode))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    logits, cache = decode(params, tokens, positions, M.init_cache(cfg, 2, MAX_T))
    out = [np.asarray(logits)]
    for s in range(steps):
        x = np.array([[row[n + s]] for row, n in zip(rows, lengths)], np.int32)
        pos = np.array([[n + s] for n in lengths], np.int32)
        logits, cache = decode(params, x, pos, cache)
        out.append(np.asarray(logits))
    batched = np.concatenate(out, axis=1)  # [2, width + steps, V]
    assert np.all(np.isfinite(batched)), "padding slots produced non-finite logits"
    for r, (row, n) in enumerate(zip(rows, lengths)):
        alone = np.asarray(forward(params, row[None, :n + steps].astype(np.int32)))[0]
        got = batched[r, width - n:]
        err = np.abs(got - alone).max(axis=-1)
        assert err.max() <= 1e-4, (f"row {r} (prompt {n}): logits differ from the unpadded row by "
                                   f"{err.max():.3g} at position {int(err.argmax())} (scale {np.abs(alone).max():.3g})")


# --------------------------------------------------------------------------- mixture of experts


@pytest.mark.parametrize("every, first, moe_layers", [(1, 0, [0, 1, 2]), (2, 1, [1]), (1, 2, [2])])
def test_moe_layers_params_and_active_count_match_closed_form(every, first, moe_layers):
    e, k, fe = 4, 2, 48
    cfg = tiny(n_layers=3, moe_experts=e, moe_experts_per_token=k, moe_every=every, moe_first_layer=first, moe_d_ff=fe)
    shapes = shapes_by_path(jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0))))
    for i in range(3):
        if i in moe_layers:
            assert shapes[f"layers_{i}/moe/router/kernel"] == (D, e)
            assert shapes[f"layers_{i}/moe/w_gate"] == shapes[f"layers_{i}/moe/w_up"] == (e, D, fe)
            assert shapes[f"layers_{i}/moe/w_down"] == (e, fe, D)
            assert not any(p.startswith(f"layers_{i}/mlp/") for p in shapes)
        else:
            assert shapes[f"layers_{i}/mlp/w_gate/kernel"] == (D, cfg.d_ff)
            assert not any(p.startswith(f"layers_{i}/moe/") for p in shapes)
    dense = M.count_params_from_config(tiny(n_layers=3))["total"]
    n_moe = len(moe_layers)
    total = dense + n_moe * (D * e + 3 * e * D * fe - 3 * D * cfg.d_ff)
    active = total - n_moe * 3 * (e - k) * D * fe
    assert M.count_params_from_config(cfg) == {"total": total, "non_embedding": total - V * D, "active": active,
                                               "active_non_embedding": active - V * D}
    # MFU counts what a token computes: its k experts and the router, never the other E - k.
    assert M.flops_per_token(cfg, MAX_T) == 6 * active + 12 * 3 * D * MAX_T


def test_moe_auto_impl_is_grouped_on_cpu_and_remat_keeps_the_aux_losses():
    cfg = tiny(moe_experts=4, moe_experts_per_token=2)
    assert M.moe_impl(cfg) == ("grouped" if jax.default_backend() == "cpu" else "ragged")
    params = o1_params(cfg)
    x = np.random.default_rng(0).integers(0, V, (2, MAX_T)).astype(np.int32)
    plain = M.loss_terms(params, cfg, x, x)
    assert set(plain) == {"loss", "moe_load_balance", "moe_router_z"}
    for policy in ("full", "dots"):
        remat = M.loss_terms(params, resolve_model(dataclasses.replace(cfg, remat=policy)), x, x)
        for key, value in plain.items():
            assert abs(float(remat[key]) - float(value)) <= 1e-6, (policy, key, float(remat[key]), float(value))


def test_an_unresolved_config_is_refused_not_built_as_another_model():
    """ModelConfig(arch="llama") leaves positions/norm/mlp unset until config.resolve_model fills them;
    built as it is, it was silently a model without RoPE, with LayerNorm and a GELU MLP."""
    raw = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)
    with pytest.raises(ValueError, match=r"ModelConfig\.positions, norm, mlp, d_ff unset: build the config with "
                                         r"atlas_jax\.config\.resolve_model"):
        M.init_params(raw, jax.random.key(0))
