"""Checkpoints with orbax's CheckpointManager: save, resume, and load for inference.

A run directory:
    RUN_DIR/config.yaml            the resolved config of the run
    RUN_DIR/tokenizer.model        the tokenizer the run trains with (tokenizer.json: a Hugging Face one)
    RUN_DIR/checkpoints/<step>/    orbax items: params, opt_state, train (step, rng, bad_steps),
                                   data_iter (the loader's state, JSON), config (JSON)

Orbax writes each step to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint loadable. The last `keep` checkpoints are kept, plus
the best by val loss.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from atlas_jax.config import Config, from_dict, resolve, to_dict
from atlas_jax.errors import CheckpointError
from atlas_jax.model import init_params
from atlas_jax.tokenizer import TOKENIZER_FILES, find_tokenizer

PyTree = Any
CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "train", "data_iter", "config")


def make_manager(run_dir: Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: PyTree, data_iter_state: dict, cfg: Config,
         val_loss: float | None = None) -> None:
    step = int(jax.device_get(state["step"]))
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({k: state[k] for k in ("step", "rng", "bad_steps")}),
        data_iter=ocp.args.JsonSave(data_iter_state),
        config=ocp.args.JsonSave(to_dict(cfg)),
    )
    metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
    manager.save(step, args=args, metrics=metrics, force=True)
    manager.wait_until_finished()


MODEL_ITEMS = ("params", "config")


def save_model(run_dir: Path, params: PyTree, cfg: Config, step: int = 0) -> Path:
    """A params-only checkpoint (an imported model, no optimizer state): `load_for_inference` reads it
    like any other; a training run starts from it with train.init_from=run:RUN_DIR."""
    # Uncompressed, at most 1 GB in flight: an import's peak memory stays near the params themselves.
    handlers = {"params": ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, use_compression=False),
                "config": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINTS, item_names=MODEL_ITEMS,
                                    item_handlers=handlers,
                                    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                               config=ocp.args.JsonSave(to_dict(cfg))), force=True)
    manager.wait_until_finished()
    manager.close()
    return Path(run_dir) / CHECKPOINTS / str(step)


def is_model_only(step_dir: Path) -> bool:
    """A checkpoint of params without optimizer state (`save_model`)."""
    return (Path(step_dir) / "params").is_dir() and not (Path(step_dir) / "opt_state").exists()


# Model fields that choose how the same function is computed; every other model field changes the
# function (or the params' shapes), so a checkpoint resumes only under the config it was made with.
LORA_FIELDS = ("rank", "alpha", "targets", "rslora", "base_quant")  # the adapters' shapes and function (dropout may change)
IMPLEMENTATION_FIELDS = ("remat", "attention", "matmul", "moe_impl")


def model_mismatch(saved: dict, cfg: Config) -> list[str]:
    """'field: checkpoint X vs config Y' for every model field that changes the math."""
    want = to_dict(cfg)["model"]
    got = saved.get("model", {})
    return [f"model.{k}: checkpoint {got.get(k)!r} vs config {want[k]!r}"
            for k in want if k not in IMPLEMENTATION_FIELDS and k in got and got[k] != want[k]]


def optimizer_mismatch(saved: dict, cfg: Config, abstract_params: PyTree) -> str | None:
    """Why the optimizer state saved under `saved`'s train section has another structure than the
    one `cfg` builds (train.grad_clip 0 <-> > 0 adds or removes the clipping state), or None."""
    from atlas_jax.optim import make_optimizer

    try:
        saved_train = from_dict({"train": saved.get("train", {})}).train
    except Exception:
        return None  # an older or foreign train section: leave the verdict to the restore itself

    def structure(t):
        return jax.tree_util.tree_structure(jax.eval_shape(make_optimizer(t).init, abstract_params))

    if structure(saved_train) == structure(cfg.train):
        return None
    want, got = to_dict(cfg)["train"], to_dict(Config(train=saved_train))["train"]
    changed = [f"train.{k}: checkpoint {got[k]!r} vs config {want[k]!r}"
               for k in ("grad_clip",) if got[k] != want[k]]
    return "; ".join(changed) or "the optimizer's settings"


def _read_json_item(step_dir: Path, item: str) -> dict:
    path = step_dir / item / "metadata"
    if not path.is_file():
        raise CheckpointError(f"{step_dir}: not a complete Atlas checkpoint ({item} is missing); "
                              f"delete it to resume from an earlier one")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt checkpoint file; delete {step_dir} to resume from an earlier one") from None


def _first_line(e: Exception) -> str:
    """The first line of an exception from orbax/tensorstore, without Python reprs (`<bound method
    pybind11_detail_function_record_v1_...>` says nothing to a person and gets cut off)."""
    text = re.sub(r"<[^<>]*(>|$)", "", str(e).strip()).strip(" :;,")
    text = " ".join(text.splitlines()[0].split()) if text else ""
    return text[:200] if text else type(e).__name__


def restore(manager: ocp.CheckpointManager, step: int, abstract: PyTree, shardings: PyTree, cfg: Config) -> tuple[PyTree, dict]:
    """Restore the train state (in its shardings) and the data iterator state of `step`."""
    step_dir = Path(manager.directory) / str(step)
    saved_cfg = _read_json_item(step_dir, "config")
    mismatch = model_mismatch(saved_cfg, cfg)
    if mismatch:
        raise CheckpointError(f"{step_dir}: checkpoint was made for a different model ({'; '.join(mismatch)}); "
                              f"use the run's own config or start a new run with --fresh or another train.run_dir")
    saved_lora = {**to_dict(Config())["lora"], **saved_cfg.get("lora", {})}  # older checkpoints: no adapters
    want_lora = to_dict(cfg)["lora"]
    lora_changed = [f"lora.{k}: checkpoint {saved_lora[k]!r} vs config {want_lora[k]!r}"
                    for k in LORA_FIELDS if saved_lora[k] != want_lora[k]]
    if lora_changed:
        raise CheckpointError(f"{step_dir}: checkpoint was made with other adapters ({'; '.join(lora_changed)}); "
                              f"use the run's own lora settings or start a new run with --fresh or another train.run_dir")
    changed = optimizer_mismatch(saved_cfg, cfg, abstract["params"])
    if changed:
        raise CheckpointError(f"{step_dir}: the optimizer state was saved with another structure ({changed}); "
                              f"resume with the run's own optimizer settings or start a new run with --fresh")
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        train=ocp.args.StandardRestore({k: target[k] for k in ("step", "rng", "bad_steps")}),
        data_iter=ocp.args.JsonRestore(),
    )
    try:
        out = manager.restore(step, args=args)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"{step_dir}: corrupt or unreadable checkpoint ({_first_line(e)}); "
                              f"delete it to resume from an earlier one") from None
    state = {"params": out["params"], "opt_state": out["opt_state"], **out["train"]}
    return state, out["data_iter"]


# --------------------------------------------------------------------------- inference


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run dir or a step dir -> (run_dir, step_dir of the latest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if (path / "params").is_dir() and (path / "config").is_dir():
        return path.parent.parent, path
    ckpt_root = path / CHECKPOINTS
    steps = sorted((int(p.name) for p in ckpt_root.iterdir() if p.name.isdigit()), reverse=True) \
        if ckpt_root.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path}: no checkpoint found (expected {ckpt_root}/<step>/); "
                              f"train first with python -m atlas_jax.train")
    return path, ckpt_root / str(steps[0])


def checkpoint_config(step_dir: Path) -> Config:
    """The resolved config a checkpoint was saved with."""
    try:
        return resolve(from_dict(_read_json_item(step_dir, "config"), source=str(step_dir / "config")))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{step_dir}: the checkpoint's config is not an Atlas config ({e})") from None


def _restore_params(step_dir: Path, abstract: PyTree) -> PyTree:
    try:
        params = ocp.StandardCheckpointer().restore(step_dir.absolute() / "params", abstract)
    except Exception as e:
        raise CheckpointError(f"{step_dir}: corrupt or unreadable params ({_first_line(e)})") from None
    return jax.tree_util.tree_map(np.asarray, params)


def load_for_inference(path: str | Path) -> tuple[PyTree, Config, Path]:
    """(params as host numpy arrays, resolved Config, tokenizer path) from a run or step dir.
    A LoRA run's params are adapters: `atlas_jax.init_from.load_model` merges them into its base."""
    run_dir, step_dir = find_checkpoint(path)
    cfg = checkpoint_config(step_dir)
    if cfg.lora.rank > 0:
        raise CheckpointError(f"{step_dir}: a LoRA run (adapters on train.init_from={cfg.train.init_from}); "
                              f"load it with atlas_jax.init_from.load_model, which merges them into the base")
    params = _restore_params(step_dir, jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0))))
    return params, cfg, tokenizer_path(run_dir, cfg)


def load_adapters(path: str | Path) -> tuple[PyTree, Config, Path]:
    """A LoRA run's (adapters as host numpy arrays, resolved Config, step dir)."""
    from atlas_jax.lora import init_adapters

    run_dir, step_dir = find_checkpoint(path)
    cfg = checkpoint_config(step_dir)
    if cfg.lora.rank == 0:
        raise CheckpointError(f"{step_dir}: not a LoRA run (lora.rank is 0): it holds a whole model, no adapters")
    base = jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0)))
    abstract = jax.eval_shape(lambda: init_adapters(base, cfg.lora, jax.random.key(0)))
    return _restore_params(step_dir, abstract), cfg, step_dir


def tokenizer_path(run_dir: Path, cfg: Config) -> Path:
    """The run's own tokenizer (tokenizer.model or tokenizer.json), else data.tokenizer."""
    own = find_tokenizer(run_dir)  # a DataError when it holds both
    candidates = [Path(run_dir) / name for name in TOKENIZER_FILES]
    if own is not None:
        return own
    if cfg.data.tokenizer:
        candidates.append(Path(cfg.data.tokenizer))
        if Path(cfg.data.tokenizer).is_file():
            return Path(cfg.data.tokenizer)
    raise CheckpointError(f"{run_dir}: the run's tokenizer is missing (looked for {', '.join(map(str, candidates))})")


def archive_run(run_dir: Path) -> Path | None:
    """--fresh: move an existing run aside (never silently overwrite it). Returns the new name."""
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    i = 1
    while (dest := run_dir.with_name(f"{run_dir.name}.old{i}")).exists():
        i += 1
    shutil.move(str(run_dir), str(dest))
    return dest
