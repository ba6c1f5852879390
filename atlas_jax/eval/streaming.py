"""Perplexity against position past the training context, through each KV-cache policy (StreamingLLM).

    rows = val_rows(run, n_rows=8, length=1024)             # [B, N + 1] tokens of the run's val split
    nll_BxN = stream_nll(params, cfg.model, rows, window=64, n_sink=4)   # or recompute_nll(...)
    buckets = by_position(nll_BxN, bytes_BxN, edges)         # perplexity and bits/byte per position range

Policies, each scoring target t + 1 from tokens 0..t of its row:
- `recompute`: a window recomputed from scratch, the latest `window` tokens as a fresh sequence
  (positions 0..window-1) for every target: the quality bar, at window x the cost of a cached step.
- `stream_nll(n_sink=k)`: one streaming cache (`model.init_cache(..., n_sink=k)`) of `window` slots
  (+ the model's sink tokens) fed one token at a time, in a `lax.scan`: k = 0 is a plain rolling
  window, k > 0 StreamingLLM's attention sinks. A sink-token model (model.sink_tokens) keeps its
  learned sinks in every policy.
- `stream_nll(n_sink=None)`: `dense`, a plain cache that keeps every token (positions past
  max_seq_len, which training never showed the model): what streaming is the fix for.
Until position `window` every policy sees the whole prefix, so they agree there.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.config import ModelConfig
from atlas_jax.eval.perplexity import EvalError
from atlas_jax.model import Transformer, init_cache


def val_rows(run: str | Path, n_rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """n_rows consecutive, disjoint slices of length + 1 tokens of the run's val split, and the UTF-8
    bytes of each target token -> (tokens_BxN1 int32, bytes_BxN int)."""
    from atlas_jax import checkpoint as ckpt
    from atlas_jax.data.prepare import load_split, run_data_dir
    from atlas_jax.tokenizer import Tokenizer

    run_dir, step_dir = ckpt.find_checkpoint(run)
    cfg = ckpt.checkpoint_config(step_dir)
    tokens = np.asarray(load_split(run_data_dir(cfg.data, run_dir), "val"))
    need = n_rows * (length + 1)
    if tokens.size < need:
        raise EvalError(f"{run}: the val split has {tokens.size} tokens, fewer than --rows {n_rows} x "
                        f"(--length {length} + 1) = {need}; lower --rows or --length")
    rows = tokens[:need].reshape(n_rows, length + 1).astype(np.int32)
    byte_lengths = Tokenizer.load(ckpt.tokenizer_path(run_dir, cfg)).token_byte_lengths()
    return rows, byte_lengths[rows[:, 1:]]


def _nll(logits_BxTxV, targets_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def _jit_per_config(fn):
    """jax.jit of fn(params, x, cfg, *ints), compiled once per config value (a ModelConfig is not hashable)."""
    @functools.cache
    def compiled(items: tuple, *static):
        cfg = ModelConfig(**dict(items))
        return jax.jit(lambda params, x: fn(params, x, cfg, *static))

    return lambda params, x, cfg, *static: compiled(tuple(dataclasses.asdict(cfg).items()), *static)(params, x)


@_jit_per_config
def _stream_nll(params, rows_BxN1, cfg: ModelConfig, window: int, n_sink: int):
    b, n1 = rows_BxN1.shape
    model = Transformer(cfg)
    decode = functools.partial(model.apply, {"params": params}, method=Transformer.decode)
    positions = jnp.broadcast_to(jnp.arange(n1, dtype=jnp.int32), (b, n1))
    cache = init_cache(cfg, b, n1, None) if n_sink < 0 else init_cache(cfg, b, window, n_sink=n_sink)
    logits, cache = decode(rows_BxN1[:, :window], positions[:, :window], cache)  # prefill: fits, no roll
    first = _nll(logits, rows_BxN1[:, 1:window + 1])

    def step(cache, t):
        token = jax.lax.dynamic_slice_in_dim(rows_BxN1, t, 1, axis=1)
        logits, cache = decode(token, jax.lax.dynamic_slice_in_dim(positions, t, 1, axis=1), cache)
        target = jax.lax.dynamic_slice_in_dim(rows_BxN1, t + 1, 1, axis=1)
        return cache, _nll(logits, target)[:, 0]

    _, rest_NxB = jax.lax.scan(step, cache, jnp.arange(window, n1 - 1))
    return jnp.concatenate([first, rest_NxB.T], axis=1)


def stream_nll(params, cfg: ModelConfig, rows_BxN1: np.ndarray, window: int, n_sink: int | None) -> np.ndarray:
    """NLL (nats) of each row's targets 1..N through a streaming cache of `window` tokens keeping the
    first n_sink (None: a dense cache of all N tokens, prefilled with the first `window`) -> [B, N] float64."""
    if n_sink is None:
        n_sink = -1
    elif not 0 <= n_sink < window <= min(cfg.max_seq_len, rows_BxN1.shape[1] - 1):
        raise EvalError(f"--sinks {n_sink} with --window {window}: need 0 <= sinks < window <= "
                        f"model.max_seq_len={cfg.max_seq_len} (and <= --length)")
    return np.asarray(_stream_nll(params, rows_BxN1, cfg, window, n_sink), np.float64)


@_jit_per_config
def _last_nll(params, windows_WxL1, cfg: ModelConfig):
    logits = Transformer(cfg).apply({"params": params}, windows_WxL1[:, :-1])
    return _nll(logits[:, -1:], windows_WxL1[:, -1:])[:, 0]


def recompute_nll(params, cfg: ModelConfig, rows_BxN1: np.ndarray, window: int, chunk: int = 256) -> np.ndarray:
    """NLL of each target from a fresh forward over the latest `window` tokens -> [B, N] float64."""
    b, n1 = rows_BxN1.shape
    first = Transformer(cfg).apply({"params": params}, rows_BxN1[:, :window])
    out = [np.asarray(_nll(first, rows_BxN1[:, 1:window + 1]), np.float64)]
    starts = np.arange(1, n1 - window)  # window rows[s : s + window] predicts rows[s + window]
    idx = starts[:, None] + np.arange(window + 1)
    windows_BxSxL1 = rows_BxN1[:, idx]
    flat = windows_BxSxL1.reshape(-1, window + 1)
    pad = (-len(flat)) % chunk  # one compiled shape
    flat = np.concatenate([flat, np.repeat(flat[-1:], pad, axis=0)])
    nll = np.concatenate([np.asarray(_last_nll(params, flat[i:i + chunk], cfg)) for i in range(0, len(flat), chunk)])
    out.append(nll[:b * len(starts)].reshape(b, len(starts)).astype(np.float64))
    return np.concatenate(out, axis=1)


def position_edges(window: int, length: int) -> list[int]:
    """[0, window/2, window, 2 window, 4 window, ..., length]: bucket edges by the target's position."""
    edges = [0, window // 2, window]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return edges + [length]


def by_position(nll_BxN: np.ndarray, bytes_BxN: np.ndarray, edges: Sequence[int]) -> list[dict]:
    """Perplexity and bits per byte of the targets whose position (1-based) lies in [lo, hi)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        nll, nbytes = nll_BxN[:, lo:hi], bytes_BxN[:, lo:hi]
        out.append({"from": lo + 1, "to": hi, "tokens": int(nll.size), "perplexity": math.exp(nll.mean()),
                    "bits_per_byte": float(nll.sum() / math.log(2) / max(int(nbytes.sum()), 1))})
    return out


def markdown(results: list[dict]) -> str:
    """One row per (model, policy), one column per position bucket: perplexity (bits per byte)."""
    from atlas_jax.eval.report import table

    header = ["model, policy"] + [f"{b['from']}-{b['to']}" for b in results[0]["buckets"]]
    rows = [[r["label"]] + [f"{b['perplexity']:.2f} ({b['bits_per_byte']:.3f})" for b in r["buckets"]]
            for r in results]
    return table(header, rows)


def plot(path: str | Path, results: list[dict], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for r in results:
        x = [math.sqrt(b["from"] * b["to"]) for b in r["buckets"]]
        ax.plot(x, [b["perplexity"] for b in r["buckets"]], marker="o", label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("target position (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
