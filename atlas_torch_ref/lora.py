"""LoRA for the PyTorch twin, written as PEFT writes it (for parity tests only).

`add_lora(model, names, rank, alpha, rslora, dropout)` swaps each named nn.Linear for a
`LoRALinear`: y = base(x) + scale * B(A(dropout(x))) with A: [r, in] and B: [out, r] (PEFT's
lora_A / lora_B weight layouts), scale = alpha / r (rsLoRA: alpha / sqrt(r)). The base weights are
frozen (requires_grad False); only A and B train.

`set_adapters` / `adapter_grads` move A and B from / to the atlas_jax adapter layout
({"layers_0": {"attn": {"wq": {"lora_a": [in, r], "lora_b": [r, out]}}}}: transposes, nothing else).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.lora_B.weight @ self.lora_A.weight


def add_lora(model: nn.Module, names: list[str], rank: int, alpha: float, rslora: bool = False,
             dropout: float = 0.0) -> nn.Module:
    """Replace the nn.Linear modules at `names` (dotted, e.g. 'layers.0.attn.wq'); freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        setattr(parent, child, LoRALinear(base, rank, alpha, rslora, dropout))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _jax_path(name: str) -> tuple[str, ...]:
    """'layers.0.attn.wq' -> ('layers_0', 'attn', 'wq')."""
    parts, out = name.split("."), []
    i = 0
    while i < len(parts):
        if parts[i] == "layers":
            out.append(f"layers_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def _node(tree: Mapping[str, Any], path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_adapters(model: nn.Module, adapters: Mapping[str, Any]) -> nn.Module:
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            ad = _node(adapters, _jax_path(name))
            m.lora_A.weight.copy_(torch.from_numpy(np.asarray(ad["lora_a"], np.float32).T.copy()))
            m.lora_B.weight.copy_(torch.from_numpy(np.asarray(ad["lora_b"], np.float32).T.copy()))
    return model


def _tree(model: nn.Module, get) -> dict:
    out: dict = {}
    for name, m in lora_modules(model).items():
        node = out
        path = _jax_path(name)
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {"lora_a": get(m.lora_A.weight).T.copy(), "lora_b": get(m.lora_B.weight).T.copy()}
    return out


def adapter_grads(model: nn.Module) -> dict:
    return _tree(model, lambda w: w.grad.detach().numpy())


def adapters_of(model: nn.Module) -> dict:
    return _tree(model, lambda w: w.detach().numpy())
