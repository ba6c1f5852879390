"""Move tensors between atlas_jax's param pytree and the torch reference, both ways.

The two layouts differ by a renaming and a transpose, nothing else:

    atlas_jax path (nested dict)          torch state-dict name
    embed/embedding          [V, D]       embed.weight           [V, D]
    layers_3/attn/wq/kernel  [in, out]    layers.3.attn.wq.weight [out, in]   (transposed)
    layers_3/attn/wq/bias    [out]        layers.3.attn.wq.bias
    layers_3/attn_norm/scale [D]          layers.3.attn_norm.weight
    layers_3/moe/w_gate      [E, D, F]    layers.3.moe.w_gate     [E, D, F]   (stacked experts: as they are)
    layers_3/attn/sink       [H]          layers.3.attn.sink      [H]         (sink logits: as they are)
    sink/embedding           [n, D]       sink.weight             [n, D]      (sink tokens)

`load_params` fills a module from a jax pytree (strict: every tensor on both sides is used once);
`grads_to_tree` / `params_to_tree` give torch grads / weights back in the jax layout, so they can be
compared per param path.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

# jax leaf name -> torch tensor name; "kernel" is also transposed.
LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Leaves with the same name and layout on both sides: a MoE layer's stacked expert weights, a head's sink logits.
AS_IS_LEAVES = ("w_gate", "w_up", "w_down", "sink")

Path = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> {("layers_0", "attn", "wq", "kernel"): leaf}."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def torch_name(path: Path) -> str:
    """("layers_3", "attn", "wq", "kernel") -> "layers.3.attn.wq.weight"."""
    *modules, leaf = path
    if leaf in AS_IS_LEAVES:
        modules = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
        return ".".join(modules + [leaf])
    if leaf not in LEAF_TO_TORCH:
        raise KeyError(f"{'/'.join(path)}: unknown leaf '{leaf}', expected one of {', '.join(LEAF_TO_TORCH)}")
    modules = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
    return ".".join(modules + [LEAF_TO_TORCH[leaf]])


def jax_path(module: nn.Module, name: str) -> Path:
    """"layers.3.attn.wq.weight" -> ("layers_3", "attn", "wq", "kernel"), from the owning module's type."""
    owner_name, _, tensor = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if tensor in AS_IS_LEAVES and not isinstance(owner, nn.Linear):
        leaf = tensor
    elif tensor == "bias":
        leaf = "bias"
    elif isinstance(owner, nn.Linear):
        leaf = "kernel"
    elif isinstance(owner, nn.Embedding):
        leaf = "embedding"
    else:
        leaf = "scale"  # RMSNorm / LayerNorm weight
    modules = re.sub(r"(^|\.)layers\.(\d+)(?=\.|$)", r"\1layers_\2", owner_name).split(".")
    return tuple(modules) + (leaf,)


def load_params(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """Copy an atlas_jax params pytree (arrays of any float dtype) into `module`, as float32."""
    state = module.state_dict()
    new_state = {}
    for path, value in flatten(params).items():
        name = torch_name(path)
        if name not in state:
            raise KeyError(f"{'/'.join(path)}: the torch model has no tensor '{name}'")
        array = np.asarray(value, dtype=np.float32)
        if path[-1] == "kernel":
            array = array.T
        if tuple(array.shape) != tuple(state[name].shape):
            raise ValueError(f"{'/'.join(path)}: shape {array.shape} (after transpose) != torch "
                             f"'{name}' {tuple(state[name].shape)}")
        new_state[name] = torch.from_numpy(np.array(array, order="C", copy=True))  # writable, contiguous
    missing = sorted(set(state) - set(new_state))
    if missing:
        raise KeyError(f"the jax params have nothing for torch tensors {', '.join(missing)}")
    module.load_state_dict(new_state, strict=True)
    return module


def _to_tree(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict:
    flat = {}
    for name, tensor in tensors.items():
        path = jax_path(module, name)
        array = tensor.detach().cpu().numpy()
        flat[path] = array.T.copy() if path[-1] == "kernel" else array.copy()
    return unflatten(flat)


def params_to_tree(module: nn.Module) -> dict:
    """The module's weights in the atlas_jax layout (nested dict of numpy arrays)."""
    return _to_tree(module, dict(module.named_parameters()))


def grads_to_tree(module: nn.Module) -> dict:
    """The `.grad` of every parameter in the atlas_jax layout, after `loss.backward()`. A parameter
    the loss never reached (grad None) gets zeros, its true gradient, so a comparison names it."""
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in module.named_parameters()}
    return _to_tree(module, grads)
