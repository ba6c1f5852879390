"""A Hugging Face causal LM as Atlas params: `load_hf_model(src)` streams its safetensors one tensor at
a time through the tensor table (atlas_jax.hf.convert), checking every name and shape."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from atlas_jax.config import ModelConfig
from atlas_jax.hf.convert import (HFError, architecture, atlas_model_config, canonical_name, flat_paths, is_ignored,
                                  nest, tensor_table)
from atlas_jax.hf.io import CONFIG, iter_tensors, read_config, resolve_source, weight_files
from atlas_jax.model import init_params


@dataclasses.dataclass
class HFModel:
    model_dir: Path
    hf_config: dict
    model: ModelConfig
    params: dict  # nested, float32 numpy


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    abstract = jax.eval_shape(lambda: init_params(m, jax.random.key(0)))
    return {p: tuple(x.shape) for p, x in flat_paths(abstract).items()}


def load_hf_model(src: str | Path, on_device: bool = False) -> HFModel:
    """Read a Hugging Face causal LM (local dir or hub id) as Atlas params, one tensor at a time
    (on_device: each one moved into a jax array as it is read, its host copy dropped)."""
    model_dir = resolve_source(str(src))
    hf = read_config(model_dir)
    where = str(model_dir / CONFIG)
    m = atlas_model_config(hf, where)
    files = weight_files(model_dir)
    table = {e.hf_name: e for e in tensor_table(m)}
    shapes = expected_shapes(m)
    flat: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    experts: dict[str, dict[int, np.ndarray]] = {}  # a stacked MoE param's slices, stacked once all are read
    for name, f, arr in iter_tensors(files):
        key = canonical_name(name, m)
        if key in seen:
            raise HFError(f"{f}: tensor {name} appears twice in the checkpoint; re-download the model")
        seen.add(key)
        entry = table.get(key)
        if entry is None:
            if is_ignored(key, m):
                continue
            raise HFError(f"{f}: tensor {name} is not part of a {architecture(hf, where)} that Atlas computes "
                          f"(config {where}); supported: the weights of the listed architectures, no extra options")
        for path, part in zip(entry.paths, entry.to_atlas(arr)):
            want = shapes[path] if entry.expert is None else shapes[path][1:]
            if part.shape != want:
                raise HFError(f"{f}: tensor {name} has shape {list(arr.shape)}, but {where} gives "
                              f"{list(want)} for it (as {path}); the weights and config.json disagree")
            if entry.expert is None:
                flat[path] = jax.device_put(part) if on_device else part
            else:
                experts.setdefault(path, {})[entry.expert] = part
        del arr
    missing = [e.hf_name for e in table.values() if e.hf_name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HFError(f"{model_dir}: the checkpoint lacks tensor {missing[0]}{more} that {where} needs; "
                      f"re-download the model or fix config.json")
    for path, parts in experts.items():
        stacked = np.stack([parts[e] for e in range(m.moe_experts)])
        flat[path] = jax.device_put(stacked) if on_device else stacked
    return HFModel(model_dir, hf, m, nest(flat))


