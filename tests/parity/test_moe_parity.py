"""Parity: the mixture-of-experts FFN (atlas_jax.moe, model.MoE) against the PyTorch twin's MoE.

The twin routes as Hugging Face's Mixtral block does (softmax, torch.topk, renormalised weights, a
loop over experts with index_add_), independently of both jax implementations. For each
`model.moe_impl` (grouped, ragged, dense): logits, the total loss (cross-entropy plus
load-balancing and z-loss times their coefficients, raised here to 0.1 / 0.01 so they move the
gradients), every gradient, the auxiliary terms themselves, and KV-cache decode against the full
forward; every implementation on the first case, the CPU default on the second. Tolerances are
test_model_parity's. Params are `parity_params` (O(1) activations), so the
router's probabilities are far apart and top-k picks the same experts on both sides.
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

BASE = dict(arch="llama", vocab_size=97, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=MAX_T,
            moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01)
CASES = {
    # every layer MoE, 4 experts, 2 per token, tied head
    "moe-all-e4-k2": dict(moe_experts=4, moe_experts_per_token=2),
    # every other layer (layer 1 of 2), 3 experts of width 96, 1 per token, untied head
    "moe-odd-e3-k1-f96-untied": dict(moe_experts=3, moe_experts_per_token=1, moe_every=2, moe_first_layer=1,
                                     moe_d_ff=96, tie_embeddings=False),
}
IMPLS = ["grouped", "ragged", "dense"]
T, B = 7, 3


def config(name: str, impl: str = "auto") -> ModelConfig:
    return resolve_model(ModelConfig(**{**BASE, **CASES[name], "moe_impl": impl}))


@functools.cache
def bundle(name: str) -> SimpleNamespace:
    cfg = config(name)
    params = parity_params(cfg)
    ref = load_params(TorchTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg))), params)
    return SimpleNamespace(params=params, ref=ref)


def batch(t: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(t * 100 + b)
    return (rng.integers(0, BASE["vocab_size"], (b, t), dtype=np.int32),
            rng.integers(0, BASE["vocab_size"], (b, t), dtype=np.int32))


@functools.cache
def torch_run(name: str, t: int, b: int) -> SimpleNamespace:
    ref = bundle(name).ref
    tokens, targets = (torch.from_numpy(a).long() for a in batch(t, b))
    ref.zero_grad(set_to_none=True)
    loss = ref.loss(tokens, targets)
    loss.backward()
    moes = [layer.moe for layer in ref.layers if hasattr(layer, "moe")]
    aux = {key: float(torch.stack([m.aux[key].detach() for m in moes]).mean()) for key in ("load_balance", "router_z")}
    with torch.no_grad():
        logits = ref(tokens).numpy()
    return SimpleNamespace(logits=logits, loss=loss.item(), grads=grads_to_tree(ref), aux=aux)


@functools.cache
def jax_run(name: str, impl: str, t: int, b: int) -> SimpleNamespace:
    cfg = config(name, impl)
    params = bundle(name).params
    tokens, targets = batch(t, b)
    logits = jax.jit(lambda p, x: M.Transformer(cfg).apply({"params": p}, x))(params, tokens)

    def objective(p):
        terms = M.loss_terms(p, cfg, tokens, targets)
        return M.objective(terms, cfg), terms

    (loss, terms), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return SimpleNamespace(logits=np.asarray(logits), loss=float(loss), terms={k: float(v) for k, v in terms.items()},
                           grads=jax.tree.map(np.asarray, grads))


# Every implementation on the first case, the CPU default (grouped) on the other (each costs two compiles).
CASE_IMPLS = [pytest.param(n, i, id=f"{n}-{i}") for n in CASES for i in (IMPLS if n == "moe-all-e4-k2" else ["grouped"])]


@pytest.mark.parametrize("name, impl", CASE_IMPLS)
def test_moe_logits_match_torch(name, impl, observe):
    observe(f"moe logits jax vs torch, max |Δ| ({impl})", assert_close(
        f"{name} logits (moe_impl={impl})", jax_run(name, impl, T, B).logits, torch_run(name, T, B).logits,
        LOGITS_ATOL))


@pytest.mark.parametrize("name, impl", CASE_IMPLS)
def test_moe_loss_with_aux_matches_torch(name, impl, observe):
    got, want = jax_run(name, impl, T, B), torch_run(name, T, B)
    for term, key in (("moe_load_balance", "load_balance"), ("moe_router_z", "router_z")):
        observe(f"moe {key} jax vs torch, |Δ|", assert_close(
            f"{name} {term} (moe_impl={impl})", got.terms[term], want.aux[key], LOSS_ATOL, axes=()))
    assert got.loss - got.terms["loss"] > 0.05, f"{name}: the aux losses add {got.loss - got.terms['loss']:.3g}"
    observe(f"moe total loss jax vs torch, |Δ| ({impl})", assert_close(
        f"{name} total loss (moe_impl={impl})", got.loss, want.loss, LOSS_ATOL, axes=()))


@pytest.mark.parametrize("name, impl", CASE_IMPLS)
def test_moe_grads_match_torch(name, impl, observe):
    observe(f"moe grads jax vs torch, max rel norm ({impl})", assert_grads_close(
        f"{name} grads (moe_impl={impl})", jax_run(name, impl, T, B).grads, torch_run(name, T, B).grads, GRAD_RTOL))


def test_moe_kv_cache_decode_matches_full_forward(observe):
    """Prefill 5 tokens, then one token at a time to MAX_T, batch 3 (the default moe_impl)."""
    name = "moe-all-e4-k2"
    cfg, params = config(name), bundle(name).params
    tokens, _ = batch(MAX_T, 3)
    positions = np.broadcast_to(np.arange(MAX_T, dtype=np.int32), tokens.shape)
    decode = jax.jit(lambda p, x, pos, c: M.Transformer(cfg).apply({"params": p}, x, pos, c,
                                                                    method=M.Transformer.decode))
    cache = M.init_cache(cfg, 3, MAX_T)
    logits, cache = decode(params, tokens[:, :5], positions[:, :5], cache)
    steps = [np.asarray(logits)]
    for t in range(5, MAX_T):
        logits, cache = decode(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    observe("moe decode vs torch full forward, max |Δ|", assert_close(
        f"{name} decode vs torch full", np.concatenate(steps, axis=1), torch_run(name, MAX_T, 3).logits, DECODE_ATOL))
