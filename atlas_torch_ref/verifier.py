"""The verifier for the PyTorch twin (parity tests only): a transformer's final-norm feature at each
row's last real token, a linear head w·h + b, and the binary cross-entropy with logits averaged over
the rows (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems")."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def score(model, head_w: torch.Tensor, head_b: torch.Tensor, tokens_BxT: torch.Tensor,
          last_B: torch.Tensor) -> torch.Tensor:
    captured = {}
    hook = model.final_norm.register_forward_hook(lambda mod, inp, out: captured.update(h=out))
    try:
        model(tokens_BxT)
    finally:
        hook.remove()
    h_BxD = captured["h"][torch.arange(tokens_BxT.shape[0]), last_B]
    return h_BxD @ head_w + head_b


def verifier_loss(model, head_w, head_b, tokens_BxT, last_B, labels_B) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(score(model, head_w, head_b, tokens_BxT, last_B), labels_B.float())
