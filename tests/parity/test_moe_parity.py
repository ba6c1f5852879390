"""Parity: the mixture-of-experts FFN (atlas_jax.moe, model.MoE) against the PyTorch twin's MoE.

The twin routes as Hugging Face's Mixtral block does (softmax, torch.topk, renormalised weights, a
loop over experts with index_add_), independently of both jax implementations. For each
`model.moe_impl` (grouped, ragged, dense): logits, the total loss (cross-entropy plus
load-balancing and z-loss times their coefficients, raised here to 0.1 / 0.01 so they move the
gradients), every gradient, the auxiliary terms themselves, and KV-cache decode against the full
forward; every implementation on the first case, the CPU default on the second. Tolerances are
test_model_parity's. Params are `parity_params` (O(1) activations), so the
router's probabilities are far apart and top-k picks the same experts on both sides.
Expert parallelism (4 forced host devices in a subprocess): the all_to_all dispatch on several
meshes, dropless and with a capacity factor that drops assignments, against the twin told the same
token groups and expert devices.
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


# Expert parallelism: the MoE layers under a mesh with an expert axis (model.expert_parallel: a
# shard_map whose all_to_all sends each token to its experts' devices), dropless and with a capacity
# factor that drops assignments, against the twin told the same token groups and expert devices.
EP_SCRIPT = r"""
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from atlas_jax import model as M
from atlas_jax.sharding import batch_sharding, make_mesh
from atlas_jax.train_step import under_mesh
from tests.parity.test_moe_parity import EP_RUNS, batch, bundle, config

out = {}
for mesh_shape, factor, impl in EP_RUNS:
    mesh = make_mesh(mesh_shape)
    cfg = dataclasses.replace(config("moe-all-e4-k2", impl), moe_capacity_factor=factor)
    params = bundle("moe-all-e4-k2").params
    tokens, targets = batch(7, 8)

    def objective(p, x, y):
        terms = M.loss_terms(p, cfg, x, y)
        return M.objective(terms, cfg), terms

    step = jax.jit(under_mesh(jax.value_and_grad(objective, has_aux=True), mesh),
                   in_shardings=(NamedSharding(mesh, P()), batch_sharding(mesh), batch_sharding(mesh)))
    (loss, terms), grads = step(params, tokens, targets)
    hlo = step.lower(params, tokens, targets).compile().as_text()
    tag = "x".join(map(str, mesh_shape)) + f"-cf{factor}-{impl}"
    out[tag + "/loss"] = np.asarray(loss)
    out[tag + "/dropped"] = np.asarray(terms["moe_dropped"])
    out[tag + "/all_to_all"] = np.asarray(hlo.count(" all-to-all("))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        out[tag + "/grad" + jax.tree_util.keystr(path)] = np.asarray(g)
np.savez(sys.argv[1], **out)
"""
# (mesh, capacity factor, moe_impl): each expert implementation over the received rows once.
EP_RUNS = [((1, 1, 4), 0.0, "grouped"), ((1, 1, 4), 0.5, "grouped"), ((2, 1, 2), 1.0, "ragged"),
           ((1, 2, 2), 0.5, "dense")]


@functools.cache
def torch_ep_run(groups: int, devices: int, factor: float) -> SimpleNamespace:
    cfg = dataclasses.replace(config("moe-all-e4-k2"), moe_capacity_factor=factor)
    ref = load_params(TorchTransformer(RefConfig.from_mapping(
        {**dataclasses.asdict(cfg), "moe_token_groups": groups, "moe_expert_devices": devices})), bundle("moe-all-e4-k2").params)
    tokens, targets = (torch.from_numpy(a).long() for a in batch(7, 8))
    loss = ref.loss(tokens, targets)
    loss.backward()
    return SimpleNamespace(loss=loss.item(), grads=grads_to_tree(ref))


def test_moe_expert_parallel_matches_torch(tmp_path, observe):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", EP_SCRIPT, str(tmp_path / "ep.npz")], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "ep.npz"))
    for mesh_shape, factor, impl in EP_RUNS:
        tag = "x".join(map(str, mesh_shape)) + f"-cf{factor}-{impl}"
        # 2 MoE layers x (tokens, expert ids, outputs forward; two transposed exchanges backward).
        assert got[tag + "/all_to_all"] >= 2 * 3, f"{tag}: the step has {got[tag + '/all_to_all']} all-to-alls"
        dropped = float(got[tag + "/dropped"])
        assert (dropped == 0.0) if factor == 0 else (0.0 < dropped < 1.0), f"{tag}: dropped {dropped}"
        want = torch_ep_run(int(np.prod(mesh_shape)), mesh_shape[2], factor)
        observe("moe expert parallel loss jax vs torch, |Δ|", assert_close(
            f"{tag} loss", float(got[tag + "/loss"]), want.loss, LOSS_ATOL, axes=()))
        grads = jax.tree_util.tree_map_with_path(
            lambda path, _: got[tag + "/grad" + jax.tree_util.keystr(path)], bundle("moe-all-e4-k2").params)
        observe("moe expert parallel grads jax vs torch, max rel norm", assert_grads_close(
            f"{tag} grads", grads, want.grads, GRAD_RTOL))
    # The capacity really binds: dropping changes the loss (against the dropless run on the same mesh).
    assert abs(float(got["1x1x4-cf0.5-grouped/loss"]) - float(got["1x1x4-cf0.0-grouped/loss"])) > 1e-4
