"""Parity: the verifier (atlas_jax.finetune.verifier) against the PyTorch twin (atlas_torch_ref.verifier),
on a GQA llama with an untied head and a gpt2 with biases: scores <= 1e-4, loss <= 1e-5, gradients
<= 1e-4 relative for every transformer tensor and the head."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax.finetune import verifier as V
from atlas_torch_ref import RefConfig, Transformer as TorchTransformer, grads_to_tree, load_params
from atlas_torch_ref.verifier import score as torch_score, verifier_loss as torch_verifier_loss
from tests.parity.test_model_parity import (GRAD_RTOL, LOGITS_ATOL, LOSS_ATOL, assert_close, assert_grads_close,
                                            batch, model_config, parity_params)

NAMES = ["llama-gqa2-untied", "gpt2-tied"]


@pytest.mark.parametrize("name", NAMES)
def test_verifier_scores_loss_and_grads_match_torch(name):
    cfg = model_config(name)
    rng = np.random.default_rng(3)
    lm = parity_params(cfg)
    head = {"kernel": rng.normal(0, 1 / np.sqrt(cfg.d_model), cfg.d_model).astype(np.float32),
            "bias": np.float32(0.3)}
    tokens, _ = batch(name, 12, 4)
    last = np.array([11, 3, 7, 0], np.int32)  # each row's last real token; what follows is padding
    labels = np.array([1, 0, 1, 0], np.int32)
    vparams = jax.tree.map(jnp.asarray, {"lm": lm, "head": head})

    value, grads = jax.value_and_grad(V.verifier_loss)(vparams, cfg, tokens, last, labels)
    ref = load_params(TorchTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg))), lm)
    w = torch.tensor(head["kernel"], requires_grad=True)
    b = torch.tensor(head["bias"], requires_grad=True)
    t_tokens, t_last = torch.from_numpy(tokens).long(), torch.from_numpy(last).long()
    t_loss = torch_verifier_loss(ref, w, b, t_tokens, t_last, torch.from_numpy(labels))
    t_loss.backward()

    with torch.no_grad():
        t_scores = torch_score(ref, w, b, t_tokens, t_last).numpy()
    assert_close(f"{name} verifier scores", V.score(vparams, cfg, tokens, last), t_scores, LOGITS_ATOL)
    assert_close(f"{name} verifier loss", value, t_loss.item(), LOSS_ATOL, axes=())
    assert_grads_close(f"{name} verifier grads", grads,
                       {"lm": grads_to_tree(ref), "head": {"kernel": w.grad.numpy(), "bias": b.grad.numpy()}},
                       GRAD_RTOL)
    # padding after a row's last token changes nothing (causal), and the last index matters
    noisy = tokens.copy()
    noisy[1, 4:] = (noisy[1, 4:] + 1) % cfg.vocab_size
    assert np.allclose(V.score(vparams, cfg, noisy, last), V.score(vparams, cfg, tokens, last), atol=1e-6)
    assert not np.allclose(V.score(vparams, cfg, tokens, last + 1), V.score(vparams, cfg, tokens, last), atol=1e-3)
