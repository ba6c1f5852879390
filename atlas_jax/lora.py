"""LoRA adapters (Hu et al. 2021) as pure functions over the param trees.

The base params stay as they are; the adapters are a second tree that mirrors the paths of the Dense
layers they adapt:

    adapters["layers_3"]["attn"]["wq"] = {"lora_a": [in, r], "lora_b": [r, out]}

and a Dense layer with an adapter computes  y = x W (+ b) + s * dropout(x) A B,  s = alpha / r
(rsLoRA: alpha / sqrt(r)). A is drawn as PEFT draws it (kaiming-uniform, bound 1/sqrt(in)), B is
zero, so at step 0 the adapted model IS the base model. `merge` folds s * A B into the kernels (for
export). Inside `apply` the adapters reach the layers through `flax.linen.intercept_methods`: the
model's code is not changed, and every Dense call whose module path is in the tree gets its delta.

Target names (`lora.targets`): q k v o (attention), gate up down (MLP), head (an untied lm_head),
or `all` (every one the model has). MoE experts are not Dense layers and take no adapter.

QLoRA-style base (`lora.base_quant`): every Dense kernel of the frozen base is held quantized and
dequantized inside the jitted step, just before its matmul: `int8` per output channel (absmax/127),
or `nf4` (Dettmers et al. 2023: 4-bit NormalFloat codes, two per byte, one absmax per 64 weights of
a column). Embeddings and norms stay float32. The adapters train against the dequantized weights,
and `merge` of such a run folds them into the dequantized base (what they were trained with).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.config import ConfigError, LoraConfig, ModelConfig

PyTree = Any
TARGETS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
           "gate": ("mlp", "w_gate"), "up": ("mlp", "w_up"), "down": ("mlp", "w_down"), "head": ("lm_head",)}


def scale(lora: LoraConfig) -> float:
    return lora.alpha / (math.sqrt(lora.rank) if lora.rslora else lora.rank)


def _dense_paths(params: PyTree) -> list[tuple[str, ...]]:
    """Module paths of every Dense kernel in a param tree (('layers_0', 'attn', 'wq'), ...)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] == "kernel":
            out.append(keys[:-1])
    return out


def target_paths(params: PyTree, lora: LoraConfig) -> list[tuple[str, ...]]:
    """The Dense layers `lora.targets` names, in the tree's order; a name that matches none is refused."""
    names = list(TARGETS) if lora.targets == ["all"] else lora.targets
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConfigError(f"lora.targets: unknown {', '.join(unknown)}; choose from {', '.join(TARGETS)} or all")
    paths = _dense_paths(params)
    chosen, matched = [], set()
    for p in paths:
        for n in names:
            if p[-len(TARGETS[n]):] == TARGETS[n]:
                chosen.append(p)
                matched.add(n)
    missing = [n for n in names if n not in matched]
    if missing and lora.targets != ["all"]:
        have = [n for n in TARGETS if any(p[-len(TARGETS[n]):] == TARGETS[n] for p in paths)]
        raise ConfigError(f"lora.targets: {', '.join(missing)} match no layer of this model (a tied head has no "
                          f"lm_head; MoE layers have no dense MLP); its adaptable layers: {', '.join(have)}")
    if not chosen:
        raise ConfigError("lora.targets: no layer of this model matches; use e.g. lora.targets=[q,v] or all")
    return chosen


def _get(tree: PyTree, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init_adapters(params: PyTree, lora: LoraConfig, key: jax.Array) -> dict:
    """A zero-delta adapter tree for the targeted layers (A kaiming-uniform, B = 0), float32."""
    adapters: dict = {}
    for i, path in enumerate(target_paths(params, lora)):
        d_in, d_out = _get(params, path)["kernel"].shape
        bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on an [r, in] weight
        a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, lora.rank), jnp.float32, -bound, bound)
        _set(adapters, path, {"lora_a": a, "lora_b": jnp.zeros((lora.rank, d_out), jnp.float32)})
    return adapters


def adapter_paths(adapters: PyTree) -> list[tuple[str, ...]]:
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] == "lora_a":
            out.append(keys[:-1])
    return out


def _lookup(adapters: PyTree, path: tuple[str, ...]):
    node = adapters
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node if isinstance(node, dict) and "lora_a" in node else None


def interceptor(adapters: PyTree, lora: LoraConfig, dropout_key: jax.Array | None = None):
    """A flax method interceptor adding s * dropout(x) A B to the adapted Dense layers' outputs.
    dropout_key None: no adapter dropout (evaluation)."""
    s = scale(lora)
    index = {p: i for i, p in enumerate(adapter_paths(adapters))}

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
            return out
        path = tuple(context.module.path)
        ad = _lookup(adapters, path)
        if ad is None:
            return out
        x = args[0]
        if lora.dropout > 0 and dropout_key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, index[path]), 1.0 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
        delta = (x @ ad["lora_a"].astype(x.dtype)) @ ad["lora_b"].astype(x.dtype)
        return out + (s * delta).astype(out.dtype)

    return intercept


def apply(cfg: ModelConfig, base: PyTree, adapters: PyTree, lora: LoraConfig, tokens_BxT, *,
          dropout_key: jax.Array | None = None, method=None, **kwargs):
    """Transformer(cfg).apply with the adapters in place (the same keyword arguments)."""
    from atlas_jax.model import Transformer

    with nn.intercept_methods(interceptor(adapters, lora, dropout_key)):
        if method is None:
            return Transformer(cfg).apply({"params": base}, tokens_BxT, **kwargs)
        return Transformer(cfg).apply({"params": base}, tokens_BxT, method=method, **kwargs)


def merge(base: PyTree, adapters: PyTree, lora: LoraConfig) -> PyTree:
    """The base params with s * A B added to each adapted kernel (a plain model, for export)."""
    s = scale(lora)
    merged = dict(base)
    for path in adapter_paths(adapters):
        ad = _get(adapters, path)
        layer = dict(_get(merged, path))
        layer["kernel"] = layer["kernel"] + s * (jnp.asarray(ad["lora_a"]) @ jnp.asarray(ad["lora_b"]))
        _set_copy(merged, path, layer)  # copies the dicts along the path: `base` is not changed
    return merged


def _set_copy(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree[k] = dict(tree[k])
        tree = tree[k]
    tree[path[-1]] = value


def count(adapters: PyTree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapters))


# --------------------------------------------------------------------------- quantized base (QLoRA)

# The 16 NF4 levels of QLoRA (bitsandbytes' table): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64


def _quantize_kernel(w: np.ndarray, kind: str, where: str) -> dict:
    w = np.asarray(w, np.float32)
    if kind == "int8":  # per output channel (a column of the [in, out] kernel)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        return {"int8": np.clip(np.round(w / scale), -127, 127).astype(np.int8), "scale": scale.astype(np.float32)}
    d_in, d_out = w.shape
    if d_in % NF4_BLOCK:
        raise ConfigError(f"lora.base_quant=nf4: {where} has {d_in} inputs, not a multiple of {NF4_BLOCK}; "
                          f"use lora.base_quant=int8")
    cols = w.T.reshape(d_out, d_in // NF4_BLOCK, NF4_BLOCK)  # blocks of 64 inputs of one output
    absmax = np.maximum(np.abs(cols).max(axis=-1, keepdims=True), 1e-12)
    codes = np.abs((cols / absmax)[..., None] - NF4_LEVELS).argmin(axis=-1).astype(np.uint8)
    codes = codes.reshape(d_out, d_in)
    return {"nf4": (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), "absmax": absmax[..., 0]}


def _is_quantized(node) -> bool:
    return isinstance(node, dict) and ("int8" in node or "nf4" in node)


def quantize_base(params: PyTree, kind: str) -> PyTree:
    """Host params with every Dense kernel replaced by its quantized form ({"int8", "scale"} or
    {"nf4", "absmax"}); the rest as it is."""
    def walk(node, path):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "kernel" and not isinstance(v, dict):
                    out[k] = _quantize_kernel(v, kind, "/".join(path))
                else:
                    out[k] = walk(v, path + (k,))
            return out
        return node
    return walk(params, ())


def _dequantize_kernel(node) -> jax.Array:
    if "int8" in node:
        return node["int8"].astype(jnp.float32) * node["scale"]
    packed = node["nf4"]
    d_out = packed.shape[0]
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(d_out, -1)  # [out, in]
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    blocks = values.reshape(d_out, -1, NF4_BLOCK) * node["absmax"][..., None]
    return blocks.reshape(d_out, -1).T


def dequantize_base(params: PyTree) -> PyTree:
    """The float32 model params of a `quantize_base` tree (traceable: runs inside the jitted step)."""
    def walk(node):
        if _is_quantized(node):
            return _dequantize_kernel(node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node
    return walk(params)


def tree_bytes(params: PyTree) -> int:
    return sum(int(np.asarray(x).nbytes) if not hasattr(x, "nbytes") else int(x.nbytes)
               for x in jax.tree_util.tree_leaves(params))
