"""A verifier: an Atlas transformer with a scalar head that scores (question, answer) for correctness.

    vparams = init_verifier(lm_params, cfg.model, key)        # {"lm": transformer params, "head": ...}
    logit_B = score(vparams, cfg.model, tokens_BxT, last_B)    # log-odds that each answer is correct
    loss = verifier_loss(vparams, cfg.model, tokens_BxT, last_B, labels_B)

The transformer is the model's own (`model.Transformer`, any family); the feature of a row is the
final norm's output at its last real token (`last_B`), read with flax's `capture_intermediates`, so
the model code is unchanged. The head is w·h + b (w [D] zero-initialised, so every first score is b
= the labels' log-odds). The loss is the binary cross-entropy with logits, averaged over the rows
(Cobbe et al. 2021 train their verifier with this objective); the PyTorch twin is
atlas_torch_ref/verifier.py. `train_verifier` is the small AdamW loop the arithmetic pipeline runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax.config import ModelConfig
from atlas_jax.model import Transformer

PyTree = Any


def init_verifier(lm_params: PyTree, cfg: ModelConfig, prior: float = 0.5) -> PyTree:
    """The verifier starting from a language model's params; the head scores every row `prior`."""
    prior = min(max(prior, 1e-3), 1 - 1e-3)
    return {"lm": lm_params, "head": {"kernel": jnp.zeros((cfg.d_model,), jnp.float32),
                                      "bias": jnp.asarray(np.log(prior / (1 - prior)), jnp.float32)}}


def features(lm_params: PyTree, cfg: ModelConfig, tokens_BxT, last_B):
    """final_norm(h)[b, last_b]: float32 [B, D]."""
    _, state = Transformer(cfg).apply({"params": lm_params}, tokens_BxT, True,
                                      capture_intermediates=lambda m, name: m.name == "final_norm",
                                      mutable=["intermediates"])
    h_BxTxD = state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)
    return jnp.take_along_axis(h_BxTxD, last_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def score(vparams: PyTree, cfg: ModelConfig, tokens_BxT, last_B):
    """The log-odds that each row's answer is correct: float32 [B]."""
    h_BxD = features(vparams["lm"], cfg, tokens_BxT, last_B)
    return h_BxD @ vparams["head"]["kernel"] + vparams["head"]["bias"]


def verifier_loss(vparams: PyTree, cfg: ModelConfig, tokens_BxT, last_B, labels_B):
    """Mean binary cross-entropy of the scores against labels (1 = correct, 0 = wrong)."""
    logits_B = score(vparams, cfg, tokens_BxT, last_B)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits_B, labels_B.astype(jnp.float32)))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [N, T] (T rounded up to `multiple`, so few shapes compile) and last_N."""
    t = -(-max(len(r) for r in rows) // multiple) * multiple
    tokens = np.full((len(rows), t), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, np.asarray([len(r) - 1 for r in rows], np.int32)


def scores(vparams: PyTree, cfg: ModelConfig, rows: Sequence[Sequence[int]], pad_id: int,
           batch_size: int = 64) -> np.ndarray:
    """Log-odds for token rows of any lengths, in batches."""
    fn = jax.jit(lambda p, x, last: score(p, cfg, x, last))
    out = []
    for i in range(0, len(rows), batch_size):
        tokens, last = pad_rows(rows[i:i + batch_size], pad_id)
        out.append(np.asarray(fn(vparams, tokens, last)))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def train_verifier(lm_params: PyTree, cfg: ModelConfig, rows: Sequence[Sequence[int]], labels: Sequence[int],
                   pad_id: int, steps: int, batch_size: int = 32, lr: float = 3e-4, weight_decay: float = 0.0,
                   seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> PyTree:
    """AdamW on verifier_loss over shuffled batches (warmup then cosine), the whole transformer trained."""
    labels = np.asarray(labels, np.float32)
    vparams = init_verifier(lm_params, cfg, float(labels.mean()) if len(labels) else 0.5)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(2, steps), lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    opt_state = opt.init(vparams)

    @jax.jit
    def step(p, s, tokens, last, y):
        loss, g = jax.value_and_grad(verifier_loss)(p, cfg, tokens, last, y)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    order = np.array([], np.int64)
    for i in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(rows))])
        idx, order = order[:batch_size], order[batch_size:]
        tokens, last = pad_rows([rows[j] for j in idx], pad_id)
        vparams, opt_state, loss = step(vparams, opt_state, tokens, last, labels[idx])
        if on_step is not None:
            on_step(i + 1, float(loss))
    return vparams
