"""The optimizer: AdamW with a weight-decay mask, global-norm clipping and an LR schedule.

Schedule (step = number of train steps already taken, skipped non-finite ones included, from 0):
    warmup   step < warmup_steps:  lr * (step + 1) / warmup_steps
    then     cosine | linear from lr to min_lr at step == steps, constant stays at lr
Weight decay applies to matrices (`kernel`, LoRA's `lora_a`/`lora_b`), to embeddings only when train.decay_embeddings,
and never to norm scales or biases.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from atlas_jax.config import TrainConfig


def lr_schedule(t: TrainConfig):
    warmup = max(t.warmup_steps, 0)
    decay_steps = max(t.steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = t.lr * (step + 1.0) / max(warmup, 1)
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if t.schedule == "cosine":
            decayed = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + jnp.cos(math.pi * frac))
        elif t.schedule == "linear":
            decayed = t.lr + (t.min_lr - t.lr) * frac
        else:
            decayed = jnp.asarray(t.lr, jnp.float32)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def decay_mask(params, decay_embeddings: bool):
    def decide(path, _):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['kernel']", "['lora_a']", "['lora_b']")):  # matrices, LoRA's included
            return True
        if name.endswith("['embedding']"):
            return decay_embeddings
        return False

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(
        learning_rate=lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.eps,
        weight_decay=t.weight_decay, mask=lambda p: decay_mask(p, t.decay_embeddings)))
    return optax.chain(*parts)
