"""Parity: the SFT and DPO losses (atlas_jax.train_step / atlas_jax.finetune.losses) against the
PyTorch twin (atlas_torch_ref.finetune), on a GQA llama with an untied head and a gpt2 with biases:
loss <= 1e-5, gradients <= 1e-4 relative (DPO: of the policy, the reference frozen), with LoRA too."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax import lora as L
from atlas_jax.config import Config, LoraConfig, TrainConfig
from atlas_jax.train_step import _terms
from atlas_torch_ref import RefConfig, Transformer as TorchTransformer, grads_to_tree, load_params
from atlas_torch_ref.finetune import dpo_loss, sft_loss
from atlas_torch_ref.lora import adapter_grads, add_lora, set_adapters
from tests.parity.test_model_parity import (GRAD_RTOL, LOSS_ATOL, assert_close, assert_grads_close, batch,
                                            model_config, parity_params)

NAMES = ["llama-gqa2-untied", "gpt2-tied"]


def _weights(b: int, t: int, seed: int) -> np.ndarray:
    """A prompt of random length weighs 0, the reply after it 1, padding at the end 0 again."""
    rng = np.random.default_rng(seed)
    w = np.zeros((b, t), np.float32)
    for i in range(b):
        start, end = rng.integers(1, t // 2), rng.integers(t // 2 + 1, t + 1)
        w[i, start:end] = 1.0
    return w


def _torch_model(cfg, params):
    return load_params(TorchTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg))), params)


def _t(x):
    return torch.from_numpy(np.asarray(x, np.int64))


@pytest.mark.parametrize("name", NAMES)
def test_sft_loss_and_grads_match_torch(name):
    cfg = Config(model=model_config(name), train=TrainConfig(objective="sft", init_from="run:x"))
    params = parity_params(cfg.model)
    x, y = batch(name, 12, 3)
    w = _weights(3, 12, 0)
    mb = {"inputs": x, "targets": y, "weights": w}

    def loss(p):
        return _terms(cfg, p, None, mb, None, jnp.sum(w))["loss"]

    value, grads = jax.value_and_grad(loss)(jax.tree.map(jnp.asarray, params))
    ref = _torch_model(cfg.model, params)
    t_loss = sft_loss(ref, _t(x), _t(y), torch.from_numpy(w))
    t_loss.backward()
    assert_close(f"{name} sft loss", value, t_loss.item(), LOSS_ATOL, axes=())
    assert_grads_close(f"{name} sft grads", grads, grads_to_tree(ref), GRAD_RTOL)
    # the mask matters: the unmasked loss is another number
    assert abs(float(value) - float(_terms(cfg, params, None, {**mb, "weights": np.ones_like(w)}, None,
                                           float(w.size))["loss"])) > 1e-3


def _dpo_batch(name):
    x1, y1 = batch(name, 12, 3, seed=1)
    x2, y2 = batch(name, 12, 3, seed=2)
    return {"chosen_inputs": x1, "chosen_targets": y1, "chosen_weights": _weights(3, 12, 1),
            "rejected_inputs": x2, "rejected_targets": y2, "rejected_weights": _weights(3, 12, 2)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("smoothing, rpo_alpha", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.7)])
def test_dpo_loss_and_grads_match_torch(name, smoothing, rpo_alpha):
    cfg = Config(model=model_config(name), train=TrainConfig(objective="dpo", init_from="run:x", dpo_beta=0.5,
                                                             dpo_label_smoothing=smoothing, rpo_alpha=rpo_alpha))
    ref_params = parity_params(cfg.model, seed=0)
    # the policy: the reference moved a little, so the log-ratios are not zero
    policy = jax.tree.map(lambda a, b: a + 0.05 * b, ref_params, parity_params(cfg.model, seed=1))
    mb = _dpo_batch(name)

    def loss(p):
        terms = _terms(cfg, p, jax.tree.map(jnp.asarray, ref_params), mb, None, None)
        return terms["loss"], terms

    (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(jax.tree.map(jnp.asarray, policy))
    t_policy, t_ref = _torch_model(cfg.model, policy), _torch_model(cfg.model, ref_params)
    pick = lambda k: (_t(mb[f"{k}_inputs"]), _t(mb[f"{k}_targets"]), torch.from_numpy(mb[f"{k}_weights"]))  # noqa: E731
    t_loss, t_metrics = dpo_loss(t_policy, t_ref, pick("chosen"), pick("rejected"), 0.5, smoothing, rpo_alpha)
    t_loss.backward()
    assert_close(f"{name} dpo loss", value, t_loss.item(), LOSS_ATOL, axes=())
    for k, v in t_metrics.items():
        assert_close(f"{name} {k}", terms[k], v, LOSS_ATOL, axes=())
    assert_grads_close(f"{name} dpo grads", grads, grads_to_tree(t_policy), GRAD_RTOL)
    assert all(p.grad is None for p in t_ref.parameters())


def test_dpo_with_lora_matches_torch():
    name = "llama-gqa2-untied"
    lcfg = LoraConfig(rank=3, alpha=6.0, targets=["q", "v", "down"])
    cfg = Config(model=model_config(name), train=TrainConfig(objective="dpo", init_from="run:x"), lora=lcfg)
    base = jax.tree.map(jnp.asarray, parity_params(cfg.model))
    rng = np.random.default_rng(3)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32) if p[-1].key == "lora_b" else x,
        L.init_adapters(base, lcfg, jax.random.key(0)))
    mb = _dpo_batch(name)
    value, grads = jax.value_and_grad(lambda a: _terms(cfg, a, base, mb, None, None)["loss"])(adapters)
    t_policy = _torch_model(cfg.model, jax.tree.map(np.asarray, base))
    names = [".".join(p if not p.startswith("layers_") else f"layers.{p[7:]}" for p in path)
             for path in L.adapter_paths(adapters)]
    set_adapters(add_lora(t_policy, names, lcfg.rank, lcfg.alpha), jax.tree.map(np.asarray, adapters))
    t_ref = _torch_model(cfg.model, jax.tree.map(np.asarray, base))  # LoRA's reference: the base, adapters off
    pick = lambda k: (_t(mb[f"{k}_inputs"]), _t(mb[f"{k}_targets"]), torch.from_numpy(mb[f"{k}_weights"]))  # noqa: E731
    t_loss, _ = dpo_loss(t_policy, t_ref, pick("chosen"), pick("rejected"), cfg.train.dpo_beta)
    t_loss.backward()
    assert_close("lora dpo loss", value, t_loss.item(), LOSS_ATOL, axes=())
    assert_grads_close("lora dpo adapter grads", grads, adapter_grads(t_policy), GRAD_RTOL)
