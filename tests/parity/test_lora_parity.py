"""Parity: LoRA (atlas_jax.lora) against the PyTorch twin's PEFT-style LoRALinear (atlas_torch_ref.lora).

On a GQA llama with an untied head (every target: q k v o gate up down head) and a gpt2 with biases
and a tied head (q v up down), with O(1) base params (test_model_parity.parity_params) and adapters
whose B is not zero: logits max |d| <= 1e-4, loss <= 1e-5, adapter gradients <= 1e-4 relative, the
merged model's logits within 1e-5 of base+adapters, zero-B adapters bit-identical to the base, and
10 AdamW steps on the adapters (optax vs torch.optim.AdamW) within 1e-5 relative.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from atlas_jax import lora as L
from atlas_jax import model as M
from atlas_jax.config import LoraConfig
from atlas_torch_ref import RefConfig, Transformer as TorchTransformer, load_params
from atlas_torch_ref.lora import adapter_grads, adapters_of, add_lora, set_adapters
from tests.parity.test_model_parity import (GRAD_RTOL, LOGITS_ATOL, LOSS_ATOL, assert_close, assert_grads_close,
                                            batch, model_config, parity_params)

CASES = {
    "llama-gqa2-untied": LoraConfig(rank=4, alpha=8.0, targets=["all"]),
    "gpt2-tied": LoraConfig(rank=3, alpha=6.0, targets=["q", "v", "up", "down"], rslora=True),
}
STEP_RTOL = 1e-5


def _adapters(name: str, seed: int = 0):
    cfg = model_config(name)
    base = jax.tree.map(jnp.asarray, parity_params(cfg))
    lcfg = CASES[name]
    adapters = L.init_adapters(base, lcfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    # B = 0 would make every test below trivially pass: draw it so the delta is O(0.1) of the output
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32) if p[-1].key == "lora_b" else x, adapters)
    return cfg, base, lcfg, adapters


def _torch(cfg, base, lcfg, adapters):
    ref = load_params(TorchTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg))), jax.tree.map(np.asarray, base))
    names = [".".join(p if not p.startswith("layers_") else f"layers.{p[7:]}" for p in path)
             for path in L.adapter_paths(adapters)]
    add_lora(ref, names, lcfg.rank, lcfg.alpha, lcfg.rslora)
    return set_adapters(ref, jax.tree.map(np.asarray, adapters))


@pytest.mark.parametrize("name", list(CASES))
def test_zero_b_adapters_are_the_base_model(name):
    cfg = model_config(name)
    base = jax.tree.map(jnp.asarray, parity_params(cfg))
    adapters = L.init_adapters(base, CASES[name], jax.random.key(0))
    x, _ = batch(name, 7, 3)
    got = L.apply(cfg, base, adapters, CASES[name], x)
    want = M.Transformer(cfg).apply({"params": base}, x)
    assert np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name", list(CASES))
def test_lora_logits_loss_and_adapter_grads_match_torch(name):
    cfg, base, lcfg, adapters = _adapters(name)
    ref = _torch(cfg, base, lcfg, adapters)
    x, y = batch(name, 7, 3)
    logits = L.apply(cfg, base, adapters, lcfg, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.asarray(x, np.int64))).numpy()
    delta = np.abs(np.asarray(logits) - np.asarray(M.Transformer(cfg).apply({"params": base}, x))).max()
    assert delta > 0.1, f"the adapters barely move the logits ({delta:.3g}): the test would prove little"
    assert_close(f"{name} lora logits", logits, want, LOGITS_ATOL)

    def loss(ad):
        total, n = M.cross_entropy(L.apply(cfg, base, ad, lcfg, x), y)
        return total / n

    value, grads = jax.value_and_grad(loss)(adapters)
    t_loss = ref.loss(torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64)))
    t_loss.backward()
    assert_close(f"{name} lora loss", value, t_loss.item(), LOSS_ATOL, axes=())
    assert all(p.grad is None for n, p in ref.named_parameters() if "lora_" not in n)  # the base is frozen
    assert_grads_close(f"{name} adapter grads", grads, adapter_grads(ref), GRAD_RTOL)


@pytest.mark.parametrize("name", list(CASES))
def test_merged_model_equals_base_plus_adapters(name):
    cfg, base, lcfg, adapters = _adapters(name)
    x, _ = batch(name, 16, 2)
    merged = L.merge(base, adapters, lcfg)
    assert_close(f"{name} merged", M.Transformer(cfg).apply({"params": merged}, x),
                 L.apply(cfg, base, adapters, lcfg, x), 1e-5)
    # merge leaves the base tree as it was
    assert np.array_equal(np.asarray(base["layers_0"]["attn"]["wq"]["kernel"]),
                          parity_params(cfg)["layers_0"]["attn"]["wq"]["kernel"])


@pytest.mark.parametrize("name", list(CASES))
def test_ten_adamw_steps_on_the_adapters_match_torch(name):
    cfg, base, lcfg, adapters = _adapters(name)
    ref = _torch(cfg, base, lcfg, adapters)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    opt = optax.adamw(lr, b1, b2, eps, weight_decay=wd)
    state = opt.init(adapters)
    t_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=lr, betas=(b1, b2), eps=eps,
                              weight_decay=wd)

    @jax.jit
    def step(ad, st, x, y):
        def loss(a):
            total, n = M.cross_entropy(L.apply(cfg, base, a, lcfg, x), y)
            return total / n
        g = jax.grad(loss)(ad)
        updates, st = opt.update(g, st, ad)
        return optax.apply_updates(ad, updates), st

    base_before = jax.tree.map(np.asarray, base)
    for i in range(10):
        x, y = batch(name, 7, 3, seed=10 + i)
        adapters, state = step(adapters, state, x, y)
        t_opt.zero_grad()
        ref.loss(torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64))).backward()
        t_opt.step()
    assert_grads_close(f"{name} adapters after 10 AdamW steps", adapters, adapters_of(ref), STEP_RTOL)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)))


def test_bad_targets_and_rank_are_one_line():
    from atlas_jax.config import ConfigError

    cfg = model_config("gpt2-tied")
    base = parity_params(cfg)
    with pytest.raises(ConfigError, match=r"lora.targets: head match no layer.*adaptable layers: q, k, v, o, up, down"):
        L.target_paths(base, LoraConfig(rank=2, targets=["head"]))
    with pytest.raises(ConfigError, match=r"lora.targets: unknown wq"):
        L.target_paths(base, LoraConfig(rank=2, targets=["wq"]))
