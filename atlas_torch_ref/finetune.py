"""The fine-tuning losses for the PyTorch twin (parity tests only), written from the papers:

- SFT: cross-entropy on the weighted (assistant) targets, summed and divided by the weights' sum.
- DPO (Rafailov et al. 2023): -(1-eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h), h the
  difference of the chosen and rejected log-ratios of policy to reference, log-probs summed over
  each reply's weighted tokens; averaged over pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    w = weights.reshape(-1)
    return (nll * w).sum() / w.sum()


def reply_logps(model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(inputs), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked * weights).sum(-1)


def dpo_loss(policy, reference, chosen: tuple, rejected: tuple, beta: float, label_smoothing: float = 0.0,
             rpo_alpha: float = 0.0):
    """(loss, {rewards}) with chosen / rejected = (inputs, targets, weights); rpo_alpha > 0 adds alpha
    times the chosen replies' NLL per token, averaged over pairs (RPO, Pang et al. 2024)."""
    pc, pr = reply_logps(policy, *chosen), reply_logps(policy, *rejected)
    with torch.no_grad():
        rc, rr = reply_logps(reference, *chosen), reply_logps(reference, *rejected)
    h = (pc - rc) - (pr - rr)
    loss = (-(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)).mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * (-pc / chosen[2].sum(-1).clamp(min=1.0)).mean()
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    return loss, {"rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
                  "rewards/margins": (chosen_r - rejected_r).mean().item()}
