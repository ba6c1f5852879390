"""Calibrated 4-bit weights: GPTQ (Frantar et al., 2022) written as plain GGML Q4_0 blocks.

A Q4_0 block is 32 weights of one row: an f16 scale d and 32 4-bit codes q, w ~ d * (q - 8). The
reference quantizer (gguf.quants, llama.cpp without an imatrix) rounds each weight to the nearest
code on its own. GPTQ instead quantizes a matrix one input column at a time and moves each
column's rounding error onto the columns not yet quantized, weighted by the inverse of the layer
input's second moment H = E[x x^T] (measured on calibration text). It minimises the error of the
layer's *output* ||X W - X W_q|| rather than of the weights, so the file needs no new format: llama.cpp
reads the same Q4_0 blocks. Scales are chosen per block when the block's first column is reached,
by llama.cpp's `make_qx_quants` search (19 candidate scales, least-squares fit, weighted by diag H).

    hessians = input_hessians(params, cfg, windows_NxT)   # {"layers_0/attn/wq": H [in, in], ...}
    blocks = gptq_q4_0(w_OUTxIN, hessians["layers_0/attn/wq"])   # uint8 [out, in / 32 * 18]
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

QK4_0 = 32  # weights per Q4_0 block
LAZY_COLUMNS = 128  # columns per lazy update (a multiple of QK4_0)


def input_hessians(params: Mapping, cfg: Any, windows_NxT: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """H = mean over calibration tokens of x x^T, for the input x of every Dense layer of the model,
    keyed by the layer's param path ("layers_0/mlp/w_down"). float64 [in, in]."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from atlas_jax.model import Transformer

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            x = jnp.asarray(args[0], jnp.float32).reshape(-1, args[0].shape[-1])
            key = "/".join(context.module.path)
            sums[key] = sums.get(key, 0.0) + np.asarray(x.T @ x, np.float64)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return next_fun(*args, **kwargs)

    model = Transformer(cfg)
    windows_NxT = np.asarray(windows_NxT, np.int32)
    with jax.default_matmul_precision("highest"), nn.intercept_methods(record):
        for i in range(0, len(windows_NxT), batch):
            model.apply({"params": params}, jnp.asarray(windows_NxT[i:i + batch]))
    return {k: sums[k] / counts[k] for k in sums}


def search_scales(x_NxB: np.ndarray, w_NxB: np.ndarray) -> np.ndarray:
    """Per-block Q4_0 scale minimising sum w (x - d q)^2 over llama.cpp's candidates
    d0 = -max / (8 + 0.1 k), k in [-9, 9], each refit by least squares for its codes. float64 [N]."""
    i = np.abs(x_NxB).argmax(-1)
    signed_max = np.take_along_axis(x_NxB, i[:, None], -1)[:, 0]
    safe_max = np.where(signed_max == 0, 1.0, signed_max)
    best_err = np.full(len(x_NxB), np.inf)
    best_d = np.zeros(len(x_NxB))
    for k in range(-9, 10):
        inv = -(8 + 0.1 * k) / safe_max
        q = np.clip(np.round(inv[:, None] * x_NxB), -8, 7)
        sum_qx, sum_qq = (w_NxB * x_NxB * q).sum(-1), (w_NxB * q * q).sum(-1)
        d = np.where(sum_qq > 0, sum_qx / np.where(sum_qq > 0, sum_qq, 1.0), 0.0)
        err = (w_NxB * (x_NxB - d[:, None] * q) ** 2).sum(-1)
        better = err < best_err
        best_err, best_d = np.where(better, err, best_err), np.where(better, d, best_d)
    return np.where(signed_max == 0, 0.0, best_d)


def pack_q4_0(d_N: np.ndarray, q_NxB: np.ndarray) -> np.ndarray:
    """Scales and codes in [-8, 7] -> GGML Q4_0 blocks, uint8 [N, 18] (f16 d, then codes j | j+16 << 4)."""
    u = (q_NxB + 8).astype(np.uint8)
    nibbles = u[:, :QK4_0 // 2] | (u[:, QK4_0 // 2:] << np.uint8(4))
    return np.concatenate([d_N.astype(np.float16).view(np.uint8).reshape(-1, 2), nibbles], axis=-1)


def gptq_q4_0(w_OUTxIN: np.ndarray, h_INxIN: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """GPTQ-quantized rows of one matrix (GGUF row order: [out, in]) as Q4_0 blocks, uint8
    [out, in / 32 * 18] (what GGUFWriter.add_tensor takes with raw_dtype Q4_0)."""
    rows, cols = w_OUTxIN.shape
    if cols % QK4_0:
        raise ValueError(f"rows of {cols} do not split into {QK4_0}-wide Q4_0 blocks")
    w = np.array(w_OUTxIN, np.float64)
    h = np.array(h_INxIN, np.float64)
    dead = np.diag(h) == 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(cols)
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    scales = np.zeros((rows, cols // QK4_0))
    codes = np.zeros((rows, cols), np.int8)
    diag = np.diag(h)
    for start in range(0, cols, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, cols)
        err = np.zeros((rows, end - start))
        for i in range(start, end):
            if i % QK4_0 == 0:
                block = w[:, i:i + QK4_0]
                d = search_scales(block, np.broadcast_to(diag[i:i + QK4_0], block.shape))
                scales[:, i // QK4_0] = d.astype(np.float16)  # quantize against the scale the file holds
            d = scales[:, i // QK4_0]
            q = np.clip(np.round(w[:, i] / np.where(d == 0, 1.0, d)), -8, 7) * (d != 0)
            codes[:, i] = q
            e = (w[:, i] - d * q) / u[i, i]
            w[:, i + 1:end] -= np.outer(e, u[i, i + 1:end])
            err[:, i - start] = e
        w[:, end:] -= err @ u[start:end, end:]
    blocks = pack_q4_0(scales.reshape(-1), codes.reshape(-1, QK4_0))
    return blocks.reshape(rows, -1)
