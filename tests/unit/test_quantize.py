"""GPTQ into Q4_0 blocks (atlas_jax/export/quantize.py): the layout gguf.quants reads, a smaller
layer-output error than round-to-nearest, and input statistics taken from the real model."""
from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from atlas_jax.config import ModelConfig, resolve_model
from atlas_jax.export import quantize as Q
from atlas_jax.model import init_params


def correlated_inputs(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Inputs whose features are correlated and unequal in scale, as a layer's inputs are."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * 0.3 + np.eye(d)
    return rng.normal(size=(n, d)) @ mix * rng.uniform(0.2, 3.0, size=d)


def test_pack_writes_the_blocks_gguf_quants_writes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, Q.QK4_0)).astype(np.float32)
    x[3] = 0.0  # an all-zero block
    # gguf.quants' reference rule: d = max / -8, code = trunc(x / d + 8.5) clipped to [0, 15].
    signed_max = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    d = signed_max / -8
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    q = np.clip(np.trunc(x * inv[:, None] + np.float32(8.5)), 0, 15).astype(np.int8) - 8
    ours = Q.pack_q4_0(d, q)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, QT.Q4_0).reshape(ours.shape))
    back = gguf.quants.dequantize(ours.reshape(-1), QT.Q4_0).reshape(x.shape)
    np.testing.assert_allclose(back, d.astype(np.float16).astype(np.float32)[:, None] * q, rtol=0, atol=0)


def test_scale_search_never_does_worse_than_the_reference_scale():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=(500, Q.QK4_0))
    w = rng.uniform(0.1, 2.0, size=x.shape)
    d = Q.search_scales(x, w)
    signed_max = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    ref = signed_max / -8

    def err(scale):
        q = np.clip(np.round(x / scale[:, None]), -8, 7)
        return (w * (x - scale[:, None] * q) ** 2).sum(-1)

    assert np.all(err(d) <= err(ref) * (1 + 1e-12))
    assert err(d).mean() < 0.9 * err(ref).mean()


def test_gptq_blocks_cut_the_layer_output_error_of_rounding():
    x = correlated_inputs(4096, 128)
    w = np.random.default_rng(3).normal(size=(96, 128)) * 0.05  # GGUF rows [out, in]
    h = x.T @ x / len(x)
    blocks = Q.gptq_q4_0(w, h)
    assert blocks.dtype == np.uint8 and blocks.shape == (96, 128 // Q.QK4_0 * 18)
    gptq = gguf.quants.dequantize(blocks, QT.Q4_0)
    rtn = gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), QT.Q4_0), QT.Q4_0)
    out_err = lambda wq: np.linalg.norm(x @ (w - wq).T) / np.linalg.norm(x @ w.T)  # noqa: E731
    assert out_err(gptq) < 0.75 * out_err(rtn), (out_err(gptq), out_err(rtn))
    # Every weight lies on its block's grid of 16 codes, d * [-8, 7].
    d = blocks.reshape(96, -1, 18)[..., :2].copy().view(np.float16).astype(np.float32)  # [96, 4, 1]
    codes = gptq.reshape(96, -1, Q.QK4_0) / np.where(d == 0, 1, d)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= -8 and codes.max() <= 7


def test_gptq_ignores_dead_inputs_and_rejects_rows_that_do_not_block():
    x = correlated_inputs(2048, 64)
    x[:, 5] = 0.0
    w = np.random.default_rng(4).normal(size=(8, 64))
    out = gguf.quants.dequantize(Q.gptq_q4_0(w, x.T @ x / len(x)), QT.Q4_0)
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="32-wide"):
        Q.gptq_q4_0(np.zeros((4, 48)), np.eye(48))


def test_input_hessians_are_the_second_moments_of_each_dense_input():
    cfg = resolve_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=16, tie_embeddings=False))
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(5).integers(0, 64, size=(3, 16))
    hs = Q.input_hessians(params, cfg, tokens, batch=2)
    assert set(hs) == {f"layers_{i}/{m}" for i in range(2) for m in
                       ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w_gate", "mlp/w_up", "mlp/w_down")} | {"lm_head"}
    assert hs["layers_0/mlp/w_down"].shape == (cfg.d_ff, cfg.d_ff)
    # layers_0's q/k/v read RMSNorm(embedding): recompute that by hand.
    x = np.asarray(params["embed"]["embedding"], np.float64)[tokens].reshape(-1, cfg.d_model)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(params["layers_0"]["attn_norm"]["scale"])
    np.testing.assert_allclose(hs["layers_0/attn/wq"], x.T @ x / len(x), rtol=1e-5, atol=1e-6)  # float32 sums
    for h in hs.values():
        np.testing.assert_allclose(h, h.T, atol=1e-12)
        assert np.linalg.eigvalsh(h).min() > -1e-9
