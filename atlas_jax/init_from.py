"""`train.init_from`: start a training run from another model's params.

    train.init_from: run:PATH    another Atlas run (its latest checkpoint) or one checkpoint's step dir
    train.init_from: hf:SRC      a Hugging Face model directory or hub id (atlas_jax.hf)

The new run keeps that model's architecture and tokenizer: `with_init_model` takes every model field
from the source except how it is computed (remat, attention, matmul, compute_dtype) and dropout, and
refuses a config that sets an architecture field to something else. The optimizer and the LR
schedule start fresh at step 0. Once the new run has checkpoints of its own it resumes from them like
any run (the source is then read only for its config and tokenizer, never its params).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax import checkpoint as ckpt
from atlas_jax.config import Config, ModelConfig, resolve, resolve_model
from atlas_jax.data.corpora import sha256_file
from atlas_jax.errors import CheckpointError, ConfigError

# What the new run may choose for itself: how the same function is computed, and dropout.
OWN_FIELDS = ckpt.IMPLEMENTATION_FIELDS + ("compute_dtype", "dropout")


@dataclasses.dataclass
class InitSource:
    spec: str  # train.init_from as given
    model: ModelConfig
    tokenizer: Path  # a tokenizer file (native name: tokenizer.model or tokenizer.json)
    load_params: Callable[[], Any]  # nested float32 numpy params, read when the run starts fresh
    where: str  # the checkpoint or model directory, for logs


def init_source(spec: str, scratch: Path) -> InitSource:
    """Resolve train.init_from (no params read yet); an hf: tokenizer is written into `scratch`."""
    kind, _, src = spec.partition(":")
    if kind == "run":
        run_dir, step_dir = ckpt.find_checkpoint(src)
        cfg = ckpt.checkpoint_config(step_dir)
        return InitSource(spec, cfg.model, ckpt.tokenizer_path(run_dir, cfg),
                          lambda: load_model(step_dir)[0], str(step_dir))
    from atlas_jax.hf.convert import atlas_model_config
    from atlas_jax.hf.io import CONFIG, read_config, resolve_source
    from atlas_jax.hf.load import load_hf_model
    from atlas_jax.tokenizer import import_hf_tokenizer

    model_dir = resolve_source(src)
    model = atlas_model_config(read_config(model_dir), str(model_dir / CONFIG))
    tokenizer = import_hf_tokenizer(model_dir, scratch)
    return InitSource(spec, model, tokenizer, lambda: load_hf_model(model_dir).params, str(model_dir))


def with_init_model(cfg: Config, init: InitSource) -> Config:
    """cfg with the source's architecture (and the run's own implementation choices)."""
    default = resolve_model(ModelConfig())
    for f in dataclasses.fields(ModelConfig):
        k = f.name
        if k in OWN_FIELDS:
            continue
        mine, theirs = getattr(cfg.model, k), getattr(init.model, k)
        if mine != theirs and mine != getattr(default, k):
            raise ConfigError(f"model.{k}={mine!r}, but the train.init_from model ({init.spec}) has {theirs!r}; "
                              f"the architecture comes from train.init_from, so leave model.{k} out of the config")
    model = dataclasses.replace(init.model, **{k: getattr(cfg.model, k) for k in OWN_FIELDS})
    return resolve(dataclasses.replace(cfg, model=model))


def check_tokenizer(cfg: Config, init: InitSource, run_dir: Path) -> Path:
    """Where the run keeps the source's tokenizer (<run_dir>/<its name>); refuses another one in
    data.tokenizer or an existing run copy that differs."""
    want = sha256_file(init.tokenizer)
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).resolve() != (run_dir / init.tokenizer.name).resolve():
        if not Path(cfg.data.tokenizer).is_file() or sha256_file(Path(cfg.data.tokenizer)) != want:
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of the train.init_from model "
                              f"({init.tokenizer}); leave data.tokenizer out: the model's own tokenizer is used")
    own = run_dir / init.tokenizer.name
    if own.is_file() and sha256_file(own) != want:
        raise ConfigError(f"{own}: the run's tokenizer is not the one of train.init_from ({init.spec}); "
                          f"start the run in another train.run_dir, or with --fresh")
    return own


# --------------------------------------------------------------------------- LoRA runs

LORA_BASE = "lora_base.json"  # in a LoRA run dir: which base its adapters were trained on


def params_sha256(params: Any) -> str:
    """A checksum of a param tree: every path and its float32 bytes, in sorted path order."""
    import jax

    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(x, np.float32)).tobytes())
    return h.hexdigest()


def write_lora_base(run_dir: Path, init: InitSource, sha256: str) -> None:
    path = Path(run_dir) / LORA_BASE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"init_from": init.spec, "where": init.where, "sha256": sha256}, indent=2) + "\n")
    tmp.replace(path)


def check_lora_base(run_dir: Path, sha256: str, spec: str) -> None:
    """Refuse adapters whose recorded base is not the one train.init_from gives now."""
    path = Path(run_dir) / LORA_BASE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: unreadable; it records the base the adapters were trained on") from None
    if saved != sha256:
        raise CheckpointError(f"{run_dir}: its adapters were trained on another base (sha256 {saved[:12]}, recorded in "
                              f"{LORA_BASE}) than train.init_from={spec} gives now ({sha256[:12]}); point "
                              f"train.init_from at that base, or start a new run")


def load_model(path: str | Path) -> tuple[Any, Config, Path]:
    """(params, resolved Config, tokenizer path) of any run or step dir; a LoRA run's adapters are
    merged into its base (train.init_from, checked against the checksum the run recorded)."""
    from atlas_jax.lora import merge

    run_dir, step_dir = ckpt.find_checkpoint(path)
    cfg = ckpt.checkpoint_config(step_dir)
    if cfg.lora.rank == 0:
        return ckpt.load_for_inference(step_dir)
    adapters, cfg, _ = ckpt.load_adapters(step_dir)
    base = base_params(cfg, run_dir)
    if cfg.lora.base_quant != "none":  # the adapters were trained against the dequantized base
        from atlas_jax.lora import dequantize_base, quantize_base
        base = dequantize_base(quantize_base(base, cfg.lora.base_quant))
    merged = merge(base, adapters, cfg.lora)
    import jax
    return jax.tree_util.tree_map(np.asarray, merged), cfg, ckpt.tokenizer_path(run_dir, cfg)


def base_params(cfg: Config, run_dir: Path) -> Any:
    """The frozen base of a LoRA run, checked against the run's recorded checksum."""
    with tempfile.TemporaryDirectory() as scratch:
        base = init_source(cfg.train.init_from, Path(scratch)).load_params()
    check_lora_base(run_dir, params_sha256(base), cfg.train.init_from)
    return base
