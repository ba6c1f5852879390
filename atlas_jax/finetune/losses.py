"""The fine-tuning losses (pure JAX).

SFT: the next-token cross-entropy on assistant tokens only (weights 1), normalised per token over
the whole global batch: sum of weighted NLL / sum of weights (what trl's SFTTrainer computes), the
same number whatever train.microbatches is.

DPO (Rafailov et al. 2023): with log-probabilities summed over each reply's tokens,
    z = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)      (eps: label smoothing)
averaged over pairs. Rewards as trl logs them: rewards/chosen = beta * (log pi - log ref) of y_w,
rewards/rejected the same of y_l, rewards/accuracies = mean(chosen > rejected) (a tie counts 1/2),
rewards/margins =
mean(chosen - rejected).

RPO (Pang et al. 2024, trl's rpo_alpha): loss + alpha * nll_chosen, nll_chosen the chosen replies'
NLL per token (each pair's summed NLL over its weighted tokens divided by their count), averaged over
pairs like the DPO term, so the value is the same whatever train.microbatches is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def sequence_logps(logits_BxTxV, targets_BxT, weights_BxT):
    """sum_t weights * log p(target_t) per row (float32) -> [B]."""
    logits = logits_BxTxV.astype(jnp.float32)
    target = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = target - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(logp * weights_BxT, axis=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
             rpo_alpha: float = 0.0, chosen_tokens=None):
    """(mean loss, {reward metrics}) from per-pair summed log-probs [B]; rpo_alpha > 0 adds the chosen
    replies' per-token NLL (chosen_tokens [B]: each chosen reply's weighted token count) times alpha."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    z = chosen - rejected
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    metrics = {"rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
               # a tie counts one half: the untrained policy (chosen == rejected == 0) scores 0.5
               "rewards/accuracies": jnp.mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0))),
               "rewards/margins": jnp.mean(z)}
    loss = jnp.mean(losses)
    if rpo_alpha:
        metrics["nll_chosen"] = jnp.mean(-policy_chosen / jnp.maximum(chosen_tokens, 1.0))
        loss = loss + rpo_alpha * metrics["nll_chosen"]
    return loss, metrics
