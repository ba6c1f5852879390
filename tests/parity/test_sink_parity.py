"""Parity: attention sinks (model.sink_logits, model.sink_tokens) and the streaming KV cache against
the PyTorch twin, which writes the sink logit as one more softmax column (dropped after) and the sink
tokens as vectors concatenated in front of the embeddings.

Per case: logits, loss and every gradient (the sinks' own included), packed rows (segment ids) with
sink tokens, KV-cache decode against the full forward, and streaming (one-layer models, see CASES):
a cache of n_sink + window slots fed 10x max_seq_len tokens one at a time keeps its shape and gives,
at every step, the logits a from-scratch forward computes over [first n_sink tokens + the latest
ones] at positions 0..window-1 (jax's forward at STREAM_ATOL, torch's at LOGITS_ATOL). Tolerances otherwise test_model_parity's; params
are `parity_params` (O(1) activations; sink logits N(0, 1), like the scores they join).
"""
from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

from atlas_jax import model as M
from atlas_jax.config import ModelConfig, resolve_model
from atlas_torch_ref import RefConfig, Transformer as TorchTransformer, grads_to_tree, load_params

from .test_model_parity import (DECODE_ATOL, GRAD_RTOL, LOGITS_ATOL, LOSS_ATOL, MAX_T, assert_close,
                                assert_grads_close, parity_params)

STREAM_ATOL = 1e-5
BASE = dict(vocab_size=97, d_model=64, n_heads=4, n_layers=2, max_seq_len=MAX_T)
CASES = {
    "llama-gqa2-sinklogits": dict(arch="llama", n_kv_heads=2, sink_logits=True),
    "gpt2-sinktokens2": dict(arch="gpt2", sink_tokens=2),
    "llama-gqa2-sinktokens1-sinklogits-untied": dict(arch="llama", n_kv_heads=2, sink_tokens=1, sink_logits=True,
                                                      tie_embeddings=False),
    # The same on model.attention=blocked, blocks of 4: the online softmax starts from the sink logit.
    "llama-gqa2-sinktokens1-sinklogits-untied-blocked": dict(arch="llama", n_kv_heads=2, sink_tokens=1,
                                                              sink_logits=True, tie_embeddings=False,
                                                              attention="blocked", attention_block=4),
    # One layer: each cached key/value then depends on its token and cache position only, so a streamed
    # step must equal the window from scratch exactly. (With more layers a cached token keeps what it
    # saw when it was written, evicted tokens included: StreamingLLM's cache is not a recomputation.)
    "llama-mha-L1": dict(arch="llama", n_layers=1),
    "llama-gqa2-sinktokens1-sinklogits-L1": dict(arch="llama", n_kv_heads=2, sink_tokens=1, sink_logits=True,
                                                 n_layers=1),
}
SINK_CASES = [n for n in CASES if not n.endswith("-L1")]
T, B = 7, 3


def config(name: str) -> ModelConfig:
    return resolve_model(ModelConfig(**{**BASE, **CASES[name]}))


@functools.cache
def bundle(name: str) -> SimpleNamespace:
    cfg = config(name)
    params = parity_params(cfg)
    ref = load_params(TorchTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg))), params)
    model = M.Transformer(cfg)
    return SimpleNamespace(cfg=cfg, params=params, ref=ref, forward=jax.jit(lambda p, x: model.apply({"params": p}, x)),
                           decode=jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, c,
                                                                           method=M.Transformer.decode)))


def batch(t: int, b: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 100 * t + b)
    return tuple(rng.integers(0, BASE["vocab_size"], (b, t), dtype=np.int32) for _ in range(2))


def torch_logits(name: str, tokens: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return bundle(name).ref(torch.from_numpy(tokens).long(), **kw).numpy()


@pytest.mark.parametrize("t", [T, MAX_T])
@pytest.mark.parametrize("name", SINK_CASES)
def test_sink_logits_match_torch(name, t, observe):
    tokens, _ = batch(t, B)
    got = np.asarray(bundle(name).forward(bundle(name).params, tokens))
    observe("sinks: logits jax vs torch, max |Δ|", assert_close(
        f"{name} logits", got, torch_logits(name, tokens), LOGITS_ATOL))


@pytest.mark.parametrize("name", SINK_CASES)
def test_sink_loss_and_grads_match_torch(name, observe):
    b = bundle(name)
    tokens, targets = batch(T, B)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: M.loss_fn(p, b.cfg, tokens, targets)))(b.params)
    b.ref.zero_grad(set_to_none=True)
    want = b.ref.loss(torch.from_numpy(tokens).long(), torch.from_numpy(targets).long())
    want.backward()
    observe("sinks: loss jax vs torch, |Δ|", assert_close(f"{name} loss", float(loss), want.item(), LOSS_ATOL, axes=()))
    want_grads = grads_to_tree(b.ref)
    assert "sink" in want_grads or "sink" in want_grads["layers_0"]["attn"], f"{name}: no sink parameter to check"
    observe("sinks: grads jax vs torch, max rel norm", assert_grads_close(
        f"{name} grads", jax.tree.map(np.asarray, grads), want_grads, GRAD_RTOL))


def test_sink_tokens_with_packed_rows_match_torch(observe):
    """Segment ids: each segment sees the sinks and its own earlier tokens, positions restart per segment."""
    name = "llama-gqa2-sinktokens1-sinklogits-untied"
    b = bundle(name)
    tokens, _ = batch(MAX_T, 2)
    segments = np.array([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7], np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in lengths]) for lengths in ((5, 7, 4), (9, 7))])
    got = M.Transformer(b.cfg).apply({"params": b.params}, tokens, True, positions, segments)
    want = torch_logits(name, tokens, positions_BxT=torch.from_numpy(positions).long(),
                        segment_ids_BxT=torch.from_numpy(segments).long())
    observe("sinks: packed logits jax vs torch, max |Δ|", assert_close(f"{name} packed logits", got, want, LOGITS_ATOL))


@pytest.mark.parametrize("name", SINK_CASES)
def test_sink_decode_matches_full_forward(name, observe):
    """Prefill 5 tokens, then one at a time to max_seq_len, batch 3 (sink tokens rerun in every call)."""
    b = bundle(name)
    tokens, _ = batch(MAX_T, 3)
    positions = np.broadcast_to(np.arange(MAX_T, dtype=np.int32), tokens.shape)
    cache = M.init_cache(b.cfg, 3, MAX_T)
    logits, cache = b.decode(b.params, tokens[:, :5], positions[:, :5], cache)
    steps = [np.asarray(logits)]
    for t in range(5, MAX_T):
        logits, cache = b.decode(b.params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    observe("sinks: decode vs torch full forward, max |Δ|", assert_close(
        f"{name} decode vs torch full", np.concatenate(steps, axis=1), torch_logits(name, tokens), DECODE_ATOL))


@pytest.mark.parametrize("name, n_sink, window", [("llama-mha-L1", 2, 8), ("llama-mha-L1", 0, 8),
                                                  ("llama-gqa2-sinktokens1-sinklogits-L1", 2, 8),
                                                  ("llama-gqa2-sinktokens1-sinklogits-L1", 4, 8)])
def test_streaming_decode_matches_a_window_from_scratch(name, n_sink, window, observe):
    """10 x max_seq_len tokens through a cache of fixed size: the logits at step p equal a fresh forward
    over tokens[:n_sink] + the latest window - n_sink tokens, positions 0..window-1 (sink tokens first)."""
    b = bundle(name)
    n = 10 * MAX_T
    tokens, _ = batch(n, 2, seed=7)
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), tokens.shape)
    cache = M.init_cache(b.cfg, 2, window, n_sink=n_sink)
    shapes = jax.tree.map(np.shape, cache)
    logits, cache = b.decode(b.params, tokens[:, :5], positions[:, :5], cache)
    steps = [logits]
    for t in range(5, n):
        logits, cache = b.decode(b.params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        steps.append(logits)
        assert jax.tree.map(np.shape, cache) == shapes, f"{name}: the cache changed shape at step {t}"
    streamed = np.concatenate([np.asarray(x) for x in steps], axis=1)
    recent = window - n_sink
    windows = np.stack([np.concatenate([tokens[:, :n_sink], tokens[:, p - recent + 1:p + 1]], axis=1)
                        for p in range(window, n)], axis=1).reshape(-1, window)  # [B * (n - window), window]
    want_jax = np.asarray(b.forward(b.params, windows))[:, -1].reshape(2, n - window, -1)
    want_torch = torch_logits(name, windows)[:, -1].reshape(2, n - window, -1)
    observe("streaming vs jax window from scratch, max |Δ|", assert_close(
        f"{name} streaming (n_sink={n_sink}, window={window}) vs jax from scratch", streamed[:, window:], want_jax,
        STREAM_ATOL))
    observe("streaming vs torch window from scratch, max |Δ|", assert_close(
        f"{name} streaming vs torch from scratch", streamed[:, window:], want_torch, LOGITS_ATOL))
    observe("streaming before the cache fills vs torch, max |Δ|", assert_close(
        f"{name} streaming, first {window} positions vs torch full", streamed[:, :window],
        torch_logits(name, tokens[:, :window]), DECODE_ATOL))
