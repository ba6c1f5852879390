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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlas_jax import checkpoint as ckpt
from atlas_jax.config import Config, ModelConfig, resolve, resolve_model
from atlas_jax.errors import ConfigError

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
                          lambda: ckpt.load_for_inference(step_dir)[0], str(step_dir))
    from atlas_jax.hf.convert import atlas_model_config
    from atlas_jax.hf.io import CONFIG, read_config, resolve_source
    from atlas_jax.hf.run import load_hf_model
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


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizer(cfg: Config, init: InitSource, run_dir: Path) -> Path:
    """Where the run keeps the source's tokenizer (<run_dir>/<its name>); refuses another one in
    data.tokenizer or an existing run copy that differs."""
    want = sha256(init.tokenizer)
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).resolve() != (run_dir / init.tokenizer.name).resolve():
        if not Path(cfg.data.tokenizer).is_file() or sha256(Path(cfg.data.tokenizer)) != want:
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of the train.init_from model "
                              f"({init.tokenizer}); leave data.tokenizer out: the model's own tokenizer is used")
    own = run_dir / init.tokenizer.name
    if own.is_file() and sha256(own) != want:
        raise ConfigError(f"{own}: the run's tokenizer is not the one of train.init_from ({init.spec}); "
                          f"start the run in another train.run_dir, or with --fresh")
    return own
