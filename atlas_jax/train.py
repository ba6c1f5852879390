"""`python -m atlas_jax.train --config configs/X.yaml [section.key=value ...]`: the training loop.

Prepares tokenizer and shards when missing, initialises or resumes from the run directory's
latest checkpoint, trains with a jitted sharded step, evaluates, checkpoints, and ends with a
summary. Side effects (files, logs, signals) live here; the step itself is in train_step.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from atlas_jax import checkpoint as ckpt
from atlas_jax import compile_cache
from atlas_jax.config import Config, load_config, save_config
from atlas_jax.devices import device_peak
from atlas_jax.errors import AtlasError, CheckpointError, ConfigError, DataError, run_cli
from atlas_jax.files import DirLock, writable_dir
from atlas_jax.model import count_params, flops_per_token
from atlas_jax.sample import release_host_memory
from atlas_jax.sharding import (batch_sharding, check_batch_divides, global_batch, make_flag_agreement, make_mesh,
                                maybe_initialize_distributed, state_shardings)
from atlas_jax.tracking import MetricsLog, flatten_params, make_tracker, read_metrics
from atlas_jax.lora import count as lora_count
from atlas_jax.train_step import (abstract_state, base_shapes, create_sharded_state, make_eval_step,
                                   make_train_step)

@dataclass
class RunResult:
    run_dir: Path
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_seen: int = 0
    tokens_per_s: float | None = None
    mfu: float | None = None
    stopped: str = "done"  # done | interrupted | nonfinite
    history: list = field(default_factory=list)
    state: object = None  # the final train state, for callers in the same process
    base: object = None  # LoRA: the frozen base params (state["params"] holds the adapters)
    cfg: object = None  # the config the run trained with (train.init_from fills the model from its source)
    sample_prompts: list | None = None  # token prompts for the final samples (None: a newline)


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _is_main() -> bool:
    return jax.process_index() == 0


def _log(msg: str) -> None:
    if _is_main():
        print(msg, file=sys.stderr, flush=True)


def prepare_run(cfg: Config, run_dir: Path):
    """Tokenizer + shards (prepared once, by process 0; the data dir only, nothing of the run yet).
    Returns (data_dir, meta, tokenizer path)."""
    from atlas_jax.data.prepare import ensure_prepared, run_data_dir
    from jax.experimental import multihost_utils

    data_dir = run_data_dir(cfg.data, run_dir)
    tok_src = Path(cfg.data.tokenizer or data_dir / ("tokenizer.json" if cfg.data.tokenizer_type == "bytelevel" else "tokenizer.model"))
    meta = None
    if _is_main():
        # "up to date" is not news: a fresh data dir logs nothing, so an error that follows stays one line.
        meta = ensure_prepared(cfg.data, cfg.model.vocab_size, data_dir,
                               log=lambda m: None if ": up to date," in m else _log(m))
    if jax.process_count() > 1:  # the others wait for process 0's files
        multihost_utils.sync_global_devices("atlas_run_prepared")
    if meta is None:  # the other processes read what process 0 prepared
        meta = ensure_prepared(cfg.data, cfg.model.vocab_size, data_dir, log=lambda *_: None)
    return data_dir, meta, tok_src


def record_run(cfg: Config, run_dir: Path, tok_src: Path) -> None:
    """The run's own copy of its tokenizer and its resolved config.yaml, written (by process 0) once the
    checkpoint checks have passed, so a refused resume changes no file of the run."""
    if not _is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    from atlas_jax.tokenizer import TOKENIZER_FILES, Tokenizer

    # The copy keeps its native name (tokenizer.model or tokenizer.json: the content decides, not the
    # source's name); a copy under the other name is removed, so the run holds exactly one.
    name = TOKENIZER_FILES[Tokenizer.load(tok_src).kind != "sentencepiece"]
    own = run_dir / name
    if not own.is_file() or own.read_bytes() != tok_src.read_bytes():
        tmp = own.with_name(own.name + ".tmp")
        shutil.copyfile(tok_src, tmp)
        tmp.replace(own)
    for other in TOKENIZER_FILES:
        if other != name:
            (run_dir / other).unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")


def _val_set(cfg: Config, data_dir: Path, token_bytes: np.ndarray, n_devices: int):
    from atlas_jax.data.loader import val_batches

    batches = val_batches(data_dir, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)
    # A short val split can give a last batch with fewer rows: keep a multiple of the device count.
    batches = [{k: v[:len(v) // n_devices * n_devices] for k, v in b.items()} for b in batches]
    batches = [b for b in batches if len(b["inputs"])]
    if not batches:
        raise DataError(f"{data_dir}: the val split holds fewer than {n_devices} windows of {cfg.data.seq_len + 1} "
                        f"tokens (one per device); lower data.seq_len or raise data.val_fraction")
    n_bytes = int(sum(token_bytes[b["targets"]].sum() for b in batches))
    n_tokens = int(sum(b["targets"].size for b in batches))
    p, n = jax.process_index(), jax.process_count()
    local = [{k: v[p * v.shape[0] // n:(p + 1) * v.shape[0] // n] for k, v in b.items()} for b in batches]
    return local, n_tokens, n_bytes


def evaluate(eval_step, params, val_local, mesh, n_tokens: int, n_bytes: int | None) -> dict:
    """Val metrics. lm: loss, perplexity and bits per byte; sft: loss and perplexity over the assistant
    tokens (n_tokens their count); dpo: the DPO loss and rewards over the val pairs (n_tokens: pairs)."""
    totals = None
    for b in val_local:
        out = jax.device_get(eval_step(params, global_batch(b, mesh)))
        totals = out if totals is None else jax.tree_util.tree_map(lambda a, c: a + c, totals, out)
    if isinstance(totals, dict):  # dpo
        return {f"val_{k}": float(v) / n_tokens for k, v in totals.items()}
    loss = float(totals) / n_tokens
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if n_bytes:
        out["val_bpb"] = float(totals) / (n_bytes * math.log(2))
    return out


@dataclass
class _FinetuneData:
    train: dict  # prefix -> Rows ("" for sft; "chosen_" / "rejected_" for dpo)
    val: dict
    template: object
    n_train: int
    n_val: int
    truncated: int


def _finetune_data(cfg: Config, tokenizer) -> _FinetuneData:
    """Render, tokenize and split data.sources (JSONL) for train.objective sft / dpo."""
    from atlas_jax.data.corpora import resolve_sources
    from atlas_jax.finetune.data import dpo_rows, sft_rows, split
    from atlas_jax.finetune.templates import load_template

    paths = resolve_sources(cfg.data.sources)
    not_jsonl = [p for p in paths if p.suffix != ".jsonl"]
    if not_jsonl:
        raise DataError(f"{not_jsonl[0]}: train.objective={cfg.train.objective} reads JSONL examples "
                        f"(see atlas_jax/finetune/data.py for the fields); name .jsonl files in data.sources")
    template = load_template(cfg.data.chat_template)
    if cfg.train.objective == "sft":
        rows = {"": sft_rows(paths, template, tokenizer, cfg.data.seq_len, pack=cfg.data.pack)}
    else:
        chosen, rejected = dpo_rows(paths, template, tokenizer, cfg.data.seq_len)
        rows = {"chosen_": chosen, "rejected_": rejected}
    n = len(next(iter(rows.values())))
    train_idx, val_idx = split(n, cfg.data.val_fraction, cfg.data.split_seed)
    if not len(val_idx):
        raise DataError(f"{paths[0]}: {n} example(s) leave none for validation; add examples or raise "
                        f"data.val_fraction")
    truncated = sum(r.truncated for r in rows.values())
    return _FinetuneData({k: r.take(train_idx) for k, r in rows.items()}, {k: r.take(val_idx) for k, r in rows.items()},
                         template, len(train_idx), len(val_idx), truncated)


def _reference_once(cfg: Config, ft: _FinetuneData, mesh, base, base_sh) -> dict | None:
    """train.dpo_reference=once: the reference's summed reply log-probs of every train pair, computed
    before step 1 ({"chosen_ref_logps": [N], "rejected_ref_logps": [N]}); None: on the fly."""
    if cfg.train.dpo_reference != "once":
        return None
    if jax.process_count() > 1:
        raise AtlasError("train.dpo_reference=once runs in one process; use on_the_fly with several processes")
    from atlas_jax.finetune.batches import as_batch
    from atlas_jax.train_step import make_reference_logps

    start = time.perf_counter()
    fn = make_reference_logps(cfg, mesh, base, base_sh)
    n, b = ft.n_train, cfg.train.batch_size
    out: dict[str, list] = {"chosen_ref_logps": [], "rejected_ref_logps": []}
    for i in range(0, n, b):
        idx = np.arange(i, i + b) % n  # a short last chunk is filled with rows from the start, then cut
        chosen, rejected = jax.device_get(fn(global_batch(as_batch({k: r.take(idx) for k, r in ft.train.items()}),
                                                          mesh)))
        keep = min(b, n - i)
        out["chosen_ref_logps"].append(np.asarray(chosen)[:keep])
        out["rejected_ref_logps"].append(np.asarray(rejected)[:keep])
    _log(f"train.dpo_reference=once: the reference's log-probs of {n:,} train pairs in "
         f"{time.perf_counter() - start:.1f}s")
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def _finetune_val_set(cfg: Config, ft: _FinetuneData, n_devices: int):
    from atlas_jax.finetune.batches import val_batches

    batches = val_batches(ft.val, cfg.train.batch_size, n_devices)
    if not batches:
        raise DataError(f"the val split holds {ft.n_val} example(s), fewer than the {n_devices} devices; "
                        f"raise data.val_fraction")
    if cfg.train.objective == "sft":
        count = int(sum(b["weights"].sum() for b in batches))
    else:
        count = int(sum(len(b["chosen_inputs"]) for b in batches))
    p, n = jax.process_index(), jax.process_count()
    local = [{k: v[p * v.shape[0] // n:(p + 1) * v.shape[0] // n] for k, v in b.items()} for b in batches]
    return local, count, None


def plot_loss_curve(run_dir: Path) -> Path | None:
    """loss.png: train loss per step and val loss at each eval, from metrics.jsonl (DPO: beside the
    reward accuracy on train steps and val pairs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step_train, by_step_val, acc_train, acc_val = {}, {}, {}, {}
    for r in read_metrics(run_dir):  # a resumed run re-logs steps; the last record wins
        if "loss" in r:
            by_step_train[r["step"]] = r["loss"]
        if "val_loss" in r:
            by_step_val[r["step"]] = r["val_loss"]
        if "rewards/accuracies" in r:
            acc_train[r["step"]] = r["rewards/accuracies"]
        if "val_rewards/accuracies" in r:
            acc_val[r["step"]] = r["val_rewards/accuracies"]
    if not by_step_train:
        return None
    if acc_train:  # DPO: the loss beside the reward accuracy (train, smoothed over 20 steps; val)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
        s = sorted(acc_train)
        smooth = np.convolve([acc_train[i] for i in s], np.ones(20) / 20, mode="valid") if len(s) >= 20 else None
        ax2.plot(s, [acc_train[i] for i in s], lw=0.6, alpha=0.35, label="train (per step)")
        if smooth is not None:
            ax2.plot(s[19:], smooth, lw=1.5, label="train (20-step mean)")
        if acc_val:
            v = sorted(acc_val)
            ax2.plot(v, [acc_val[i] for i in v], "o-", lw=1.5, label="val pairs")
        ax2.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax2.set_xlabel("step")
        ax2.set_ylabel("rewards/accuracies (chosen > rejected)")
        ax2.set_ylim(0, 1)
        ax2.grid(alpha=0.3)
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    s = sorted(by_step_train)
    ax.plot(s, [by_step_train[i] for i in s], label="train loss", lw=1, alpha=0.8)
    if by_step_val:
        v = sorted(by_step_val)
        ax.plot(v, [by_step_val[i] for i in v], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss" if acc_train else "cross-entropy (nats/token)")
    ax.set_title(f"{Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


IN_USE = "another trainer is running in it; wait for it, stop it"


def train(cfg: Config, fresh: bool = False, progress: bool = True) -> RunResult:
    """Own the run directory (process 0 locks it for the run's life), check every output location is
    writable before any work, then train (`_train`)."""
    from atlas_jax.data.corpora import resolve_sources

    t0 = time.perf_counter()  # "time to first step" counts from here
    run_dir = Path(cfg.train.run_dir)
    if not _is_main():
        return _train(cfg, run_dir, progress, t0)
    resolve_sources(cfg.data.sources)  # a missing corpus is reported before anything is written
    if fresh and run_dir.is_dir() and any(run_dir.iterdir()):
        with DirLock(run_dir, "train.run_dir", IN_USE):  # never move a run that is training
            pass
        moved = ckpt.archive_run(run_dir)
        _log(f"--fresh: moved the previous run to {moved}")
    writable_dir(run_dir, "train.run_dir")
    with DirLock(run_dir, "train.run_dir", IN_USE):
        writable_dir(run_dir / ckpt.CHECKPOINTS, f"train.run_dir (its {ckpt.CHECKPOINTS}/)")
        if cfg.data.data_dir:
            writable_dir(cfg.data.data_dir, "data.data_dir")
        return _train(cfg, run_dir, progress, t0)


def _resolve_init(cfg: Config, run_dir: Path):
    """train.init_from: the source's architecture, and its tokenizer as the run's own (copied into the
    run dir by process 0 before the data is prepared with it)."""
    from atlas_jax.init_from import check_tokenizer, init_source, with_init_model

    with tempfile.TemporaryDirectory() as scratch:
        init = init_source(cfg.train.init_from, Path(scratch))
        cfg = with_init_model(cfg, init)
        own = check_tokenizer(cfg, init, run_dir)
        if _is_main() and not own.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = own.with_name(own.name + ".tmp")
            shutil.copyfile(init.tokenizer, tmp)
            tmp.replace(own)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(own))), init


def _place(params, shardings):
    """Host params -> global arrays in the state's shardings (each process supplies its own shards)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx])),
        params, shardings)


def _save(manager, state, it, cfg: Config, val_loss, run_dir: Path, final: bool) -> bool:
    """Save a checkpoint; on failure keep training (the state is still in memory) and say where the
    last good checkpoint is, unless this was the last chance to save (end of run or a stop)."""
    try:
        ckpt.save(manager, state, it.get_state(), cfg, val_loss)
        return True
    except Exception as e:  # a full disk, a directory made read-only under us, ...
        latest = manager.latest_step()
        step = int(jax.device_get(state["step"]))
        why = " ".join(str(e).split())[:200] or type(e).__name__
        if latest == step and (run_dir / ckpt.CHECKPOINTS / str(step)).is_dir():
            # orbax puts the new checkpoint in place before it removes the ones past train.keep
            _log(f"warning: saved {run_dir / ckpt.CHECKPOINTS / str(step)}, but could not remove an older "
                 f"checkpoint past train.keep={cfg.train.keep} ({why}); remove it by hand or fix its permissions")
            return True
        good = (f"the last good checkpoint is {run_dir / ckpt.CHECKPOINTS / str(latest)}" if latest is not None
                else "no checkpoint has been saved yet")
        if final:
            raise AtlasError(f"{run_dir / ckpt.CHECKPOINTS}: could not save the checkpoint of step {step} ({why}); "
                             f"{good}; free space or fix permissions and run the same command to resume") from None
        _log(f"warning: could not save the checkpoint of step {step} ({why}); {good}; training goes on and "
             f"tries again at the next checkpoint")
        return False


def _train(cfg: Config, run_dir: Path, progress: bool, t0: float) -> RunResult:
    from atlas_jax.data.loader import make_train_iterator
    from atlas_jax.tokenizer import Tokenizer

    steps = sorted(int(p.name) for p in (run_dir / ckpt.CHECKPOINTS).iterdir() if p.name.isdigit()) \
        if (run_dir / ckpt.CHECKPOINTS).is_dir() else []
    if steps and ckpt.is_model_only(run_dir / ckpt.CHECKPOINTS / str(steps[-1])):  # before any file is written
        raise CheckpointError(f"{run_dir / ckpt.CHECKPOINTS / str(steps[-1])}: a model without optimizer state (an "
                              f"import); train from it in a new run: train.init_from=run:{run_dir} "
                              f"train.run_dir=NEW_DIR")
    init = None
    if cfg.train.init_from:
        cfg, init = _resolve_init(cfg, run_dir)
    if cfg.lora.rank > 0:
        from atlas_jax.lora import target_paths
        target_paths(base_shapes(cfg), cfg.lora)  # lora.targets that match no layer: refused before any work
    finetune = cfg.train.objective != "lm"
    if finetune:  # chat / preference JSONL, tokenized here with the model's tokenizer and template
        tok_src = Path(cfg.data.tokenizer)
        tokenizer = Tokenizer.load(tok_src)
        ft = _finetune_data(cfg, tokenizer)
        data_dir = meta = token_bytes = None
    else:
        data_dir, meta, tok_src = prepare_run(cfg, run_dir)
        tokenizer = Tokenizer.load(tok_src)
        token_bytes = tokenizer.token_byte_lengths()

    mesh = make_mesh(cfg.train.mesh)
    check_batch_divides(cfg.train.batch_size, cfg.train.microbatches, mesh)
    manager = ckpt.make_manager(run_dir, cfg.train.keep)
    abstract = abstract_state(cfg)
    shardings = state_shardings(abstract, mesh)

    latest = manager.latest_step()
    base = base_sh = base_sha = None
    if cfg.lora.rank == 0 and cfg.train.objective == "dpo":  # the reference: a frozen copy of the start
        base_sh = state_shardings(base_shapes(cfg), mesh)
        base = _place(init.load_params(), base_sh)
    if cfg.lora.rank > 0:  # the frozen base, placed like params; the state holds the adapters
        from atlas_jax.init_from import check_lora_base, params_sha256

        host_base = init.load_params()
        base_sha = params_sha256(host_base)
        check_lora_base(run_dir, base_sha, cfg.train.init_from)
        if cfg.lora.base_quant != "none":  # QLoRA: held quantized, dequantized inside the step
            from atlas_jax.lora import quantize_base, tree_bytes
            f32_bytes = tree_bytes(host_base)
            host_base = quantize_base(host_base, cfg.lora.base_quant)
            _log(f"lora.base_quant={cfg.lora.base_quant}: the frozen base holds {tree_bytes(host_base) / 2**20:,.1f} MiB "
                 f"instead of {f32_bytes / 2**20:,.1f} MiB in float32")
        base_sh = state_shardings(host_base, mesh)
        base = _place(host_base, base_sh)
        del host_base
    if finetune:
        from atlas_jax.finetune.batches import make_example_iterator
        extras = _reference_once(cfg, ft, mesh, base, base_sh) if cfg.train.objective == "dpo" else None
        it = make_example_iterator(ft.train, cfg.train.batch_size, cfg.train.seed, jax.process_index(),
                                   jax.process_count(), extras=extras)
    else:
        it = make_train_iterator(data_dir, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed,
                                 jax.process_index(), jax.process_count())
    if latest is not None:
        if latest > cfg.train.steps:
            raise AtlasError(f"{run_dir / ckpt.CHECKPOINTS / str(latest)}: the run is already at step {latest}, past "
                             f"train.steps={cfg.train.steps}; raise train.steps to train on, or start over with --fresh")
        state, it_state = ckpt.restore(manager, latest, abstract, shardings, cfg)
        it.set_state(it_state)
    else:
        state, _ = create_sharded_state(cfg, mesh)
        if init is not None and cfg.lora.rank == 0:
            state["params"] = _place(init.load_params(), shardings["params"])
            _log(f"initialized from {init.spec} ({init.where}): its params, a fresh optimizer at step 0")
        elif init is not None:
            _log(f"initialized from {init.spec} ({init.where}): its params frozen, LoRA adapters "
                 f"(rank {cfg.lora.rank}) from zero at step 0")
    # The tracker once the resume checks passed (a refused resume writes no tb/ events) and before the
    # run's files are recorded (an unreachable train.tracking_uri changes nothing).
    tracker = make_tracker(cfg.train.tracking, cfg.train.tracking_uri, run_dir, _is_main())
    record_run(cfg, run_dir, tok_src)
    if base_sha is not None and _is_main():
        from atlas_jax.init_from import write_lora_base
        write_lora_base(run_dir, init, base_sha)
    if finetune and _is_main():
        from atlas_jax.finetune.templates import write_run_template
        write_run_template(run_dir, ft.template)
    if latest is not None:
        _log(f"resumed from {run_dir / ckpt.CHECKPOINTS / str(latest)}")
    step_fn = make_train_step(cfg, mesh, shardings, base, base_sh)
    eval_fn = make_eval_step(cfg, mesh, shardings["params"], base, base_sh)
    if finetune:
        val_local, val_tokens, val_bytes = _finetune_val_set(cfg, ft, mesh.size)
    else:
        val_local, val_tokens, val_bytes = _val_set(cfg, data_dir, token_bytes, mesh.size)

    n_params = count_params(base_shapes(cfg) if cfg.lora.rank > 0 else abstract["params"], cfg.model)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    peak_entry = device_peak()
    peak = peak_entry.flops if peak_entry else None
    active = f", {n_params['active']:,} active" if cfg.model.moe_experts else ""
    if cfg.lora.rank > 0:
        active += f"; LoRA trains {lora_count(abstract['params']):,} adapter params, the base is frozen"
    rows0 = next(iter(ft.train.values())) if finetune else None
    packed_txt = (f"{int(rows0.segments.max(axis=1).sum()):,} conversations packed into "
                  if rows0 is not None and rows0.segments is not None else "")
    data_txt = (f"{packed_txt}{ft.n_train:,} train / {ft.n_val:,} val rows ({cfg.train.objective}"
                f"{f', {ft.truncated} replies cut at data.seq_len' if ft.truncated else ''})" if finetune
                else f"{meta['splits']['train']['tokens']:,} train tokens")
    _log(f"model {cfg.model.arch}: {n_params['total']:,} params ({n_params['non_embedding']:,} non-embedding{active}); "
         f"mesh {dict(mesh.shape)}; {data_txt}; run dir {run_dir}")
    kind = jax.devices()[0].device_kind
    _log(f"MFU against {peak_entry.name}: {peak_entry.flops / 1e12:,.1f} TFLOP/s per device ({kind})" if peak_entry
         else f"MFU not reported: no peak FLOP/s known for device kind '{kind}' (atlas_jax/devices.py)")

    result = RunResult(run_dir=run_dir, step=int(jax.device_get(state["step"])))
    tracker.log_params(flatten_params(cfg))
    log = MetricsLog(run_dir, tracker, _is_main())
    start_step = result.step
    total = cfg.train.steps
    pending: list = []
    last_val = None
    bar = None
    if progress and _is_main():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
    t_window, steps_window = time.perf_counter(), 0
    t_start, tokens_done = time.perf_counter(), 0
    step = start_step
    # Several processes must stop at the same step (the save is collective): each step, every
    # process contributes its own signal flag to a tiny all-reduce, read one step later.
    agree = make_flag_agreement(mesh) if jax.process_count() > 1 else None
    prev_agreed, prev_bad = None, None

    def flush_metrics():
        nonlocal t_window, steps_window
        if not pending:
            return None
        host = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        tps = steps_window * tokens_per_step / max(now - t_window, 1e-9)
        t_window, steps_window = now, 0
        for (s, _), m in zip(pending, host):
            rec = {"step": s, **{k: float(v) for k, v in m.items()}}
            log.write(rec)
            result.history.append(rec)
        pending.clear()
        last = host[-1]
        if bar is not None:
            mfu_txt = f" mfu={tps * flops_tok / (peak * jax.device_count()):.1%}" if peak else ""
            dpo_txt = (f" acc={float(last['rewards/accuracies']):.2f} margin={float(last['rewards/margins']):.2f}"
                       if "rewards/accuracies" in last else "")
            bar.set_postfix_str(f"loss={float(last['loss']):.4f}{dpo_txt} lr={float(last['lr']):.2e} "
                                f"tok/s={tps:,.0f}{mfu_txt}")
        result.train_loss = float(last["loss"])
        return last

    with _Stop() as stop:
        while step < total:
            batch = global_batch(next(it), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            steps_window += 1
            tokens_done += tokens_per_step
            pending.append((step, metrics))
            if step == start_step + 1:  # the first step compiles: time from its end
                jax.block_until_ready(metrics)
                t_window = t_start = time.perf_counter()
                steps_window, tokens_done = 0, 0
                _log(f"time to first step {t_start - t0:.1f}s (data, state, compile; {compile_cache.describe()})")
                release_host_memory()  # the compiler's freed heap back to the OS: not held for the whole run
            if bar is not None:
                bar.update(1)
            # The non-finite streak and the stop flag are read every step, one step late: this step is
            # already queued when the host waits for the previous one's scalars.
            if agree is None:
                stopping = stop.signal is not None
            else:
                agreed = agree(stop.signal is not None)
                stopping = prev_agreed is not None and bool(jax.device_get(prev_agreed))
                prev_agreed = agreed
            streak = int(jax.device_get(prev_bad)) if prev_bad is not None else 0
            prev_bad = metrics["bad_steps"]
            if step % cfg.train.log_interval == 0 or step == total:
                streak = max(streak, int(flush_metrics()["bad_steps"]))
            if streak >= cfg.train.max_nonfinite_steps:
                result.stopped = "nonfinite"
                break
            val = None
            if step % cfg.train.eval_interval == 0 or step == total:
                val = evaluate(eval_fn, state["params"], val_local, mesh, val_tokens, val_bytes)
                last_val = val
                log.write({"step": step, **val})
                result.history.append({"step": step, **val})
                extra = (f", bits/byte {val['val_bpb']:.4f}" if "val_bpb" in val else
                         f", reward accuracy {val['val_rewards/accuracies']:.3f}, margin {val['val_rewards/margins']:.3f}"
                         if "val_rewards/accuracies" in val else " (assistant tokens)")
                _log(f"step {step}: val loss {val['val_loss']:.4f}{extra}")
            if step % cfg.train.checkpoint_interval == 0 or step == total or stopping:
                flush_metrics()
                _save(manager, state, it, cfg, val["val_loss"] if val else None, run_dir,
                      final=step == total or stopping)
            if stopping:
                result.stopped = "interrupted"
                break
    flush_metrics()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    manager.close()
    result.step = step
    result.tokens_seen = step * tokens_per_step
    result.tokens_per_s = tokens_done / elapsed if elapsed > 0 and tokens_done else None
    if peak and result.tokens_per_s:
        result.mfu = result.tokens_per_s * flops_tok / (peak * jax.device_count())
    if last_val:
        result.val_loss, result.val_bpb = last_val["val_loss"], last_val.get("val_bpb")
    if _is_main():
        tracker.log_artifact(plot_loss_curve(run_dir))
        tracker.log_artifact(run_dir / "config.yaml")
    log.close({"done": "FINISHED", "interrupted": "KILLED", "nonfinite": "FAILED"}[result.stopped])
    if result.stopped == "nonfinite":
        latest = ckpt.make_manager(run_dir, cfg.train.keep, read_only=True).latest_step()
        where = (f"the last good checkpoint {run_dir / ckpt.CHECKPOINTS / str(latest)} is intact" if latest is not None
                 else "no checkpoint was written (the run never saved before it diverged)")
        raise AtlasError(
            f"stopped at step {step}: {cfg.train.max_nonfinite_steps} steps in a row had a non-finite loss or "
            f"gradient (updates were skipped); {where}; lower train.lr or raise train.warmup_steps")
    result.state = state
    result.base = base
    result.cfg = cfg
    if finetune:  # the final samples answer the first val prompts (up to the reply), not a newline
        rows = next(iter(ft.val.values()))
        result.sample_prompts = [list(map(int, t[:int(np.argmax(w > 0)) + 1])) for t, w in
                                 zip(rows.tokens[:2], rows.weights[:2])]
    return result


def summary(result: RunResult, cfg: Config, samples: list[str] | None = None) -> str:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"run dir        {result.run_dir}",
        f"steps          {result.step} ({result.stopped})",
        f"train loss     {fmt(result.train_loss, '.4f')}",
        f"val loss       {fmt(result.val_loss, '.4f')} nats/token",
        f"val bits/byte  {fmt(result.val_bpb, '.4f')}",
        f"tokens seen    {result.tokens_seen:,}",
        f"tokens/s       {fmt(result.tokens_per_s, ',.0f')}",
        f"MFU            {fmt(result.mfu, '.1%') if result.mfu is not None else 'n/a (peak FLOP/s of ' + jax.devices()[0].device_kind + ' unknown)'}",
        f"loss curve     {result.run_dir / 'loss.png'}",
    ]
    for i, s in enumerate(samples or []):
        lines.append(f"--- sample {i + 1} ---\n{s}")
    return "\n".join(lines)


def _tree_bytes_per_device(abstract, shardings) -> int:
    """The bytes one device holds of a sharded tree: each leaf's shard shape."""
    leaves = zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings))
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in leaves)


def dry_run(cfg: Config) -> dict:
    """--dry-run: the train step compiled ahead of time for the config's mesh, from shapes only (no data,
    no params allocated, nothing written) -> bytes per device: params, optimizer state, and XLA's
    memory analysis of the compiled step (arguments, outputs, aliased, temporaries, generated code)."""
    import jax.numpy as jnp

    if cfg.train.init_from:  # (fine-tuning and LoRA need it: they are not sized here)
        raise ConfigError(f"train.init_from={cfg.train.init_from}: --dry-run sizes the config's own model, not a "
                          f"source's; leave train.init_from out and set model.* to the source's sizes")
    mesh = make_mesh(cfg.train.mesh)
    check_batch_divides(cfg.train.batch_size, cfg.train.microbatches, mesh)
    abstract = abstract_state(cfg)
    shardings = state_shardings(abstract, mesh)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=batch_sharding(mesh))
    start = time.perf_counter()
    compiled = make_train_step(cfg, mesh, shardings).lower(state, {"inputs": rows, "targets": rows}).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    out = {"params": count_params(abstract["params"], cfg.model)["total"], "mesh": dict(mesh.shape),
           "compile_s": compile_s,
           "params_bytes": _tree_bytes_per_device(abstract["params"], shardings["params"]),
           "opt_state_bytes": _tree_bytes_per_device(abstract["opt_state"], shardings["opt_state"])}
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        out[f"{key}_bytes"] = int(getattr(mem, f"{key}_size_in_bytes"))
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def dry_run_report(cfg: Config, d: dict) -> str:
    size = lambda n: f"{n:>17,} B  {n / 2**20:11,.1f} MiB"  # noqa: E731
    return "\n".join([
        f"dry run: {cfg.model.arch} {d['params']:,} params; mesh {d['mesh']}; batch {cfg.train.batch_size} x "
        f"{cfg.data.seq_len} in {cfg.train.microbatches} microbatch(es); train step compiled in {d['compile_s']:.1f}s "
        f"({compile_cache.describe()})",
        "per device:",
        f"  parameters       {size(d['params_bytes'])}",
        f"  optimizer state  {size(d['opt_state_bytes'])}",
        f"  XLA arguments    {size(d['argument_bytes'])}  (train state + batch)",
        f"  XLA outputs      {size(d['output_bytes'])}",
        f"  XLA aliased      {size(d['alias_bytes'])}  (outputs written over the donated state)",
        f"  XLA temporaries  {size(d['temp_bytes'])}",
        f"  generated code   {size(d['generated_code_bytes'])}",
        f"  total            {size(d['total_bytes'])}  (arguments + outputs - aliased + temporaries)",
    ])


def _samples(result: RunResult, cfg: Config, n: int = 2) -> list[str]:
    """A few continuations from the final params, at the config's sample settings: of a newline, or for
    sft / dpo the replies to the first val prompts."""
    from jax.experimental import multihost_utils

    from atlas_jax.sample import generate
    from atlas_jax.tokenizer import Tokenizer

    params = result.state["params"]
    if cfg.lora.rank > 0:  # LoRA: sample from the base with the adapters merged in
        from atlas_jax.lora import dequantize_base, merge
        base = dequantize_base(result.base) if cfg.lora.base_quant != "none" else result.base
        params = merge(base, params, cfg.lora)
    params = multihost_utils.process_allgather(params, tiled=True)  # collective
    if not _is_main():
        return []
    tok = Tokenizer.load(ckpt.tokenizer_path(result.run_dir, cfg))
    prompts = result.sample_prompts or [tok.encode("\n")] * n
    new_tokens = min(cfg.sample.max_new_tokens, cfg.model.max_seq_len - max(map(len, prompts)))
    sample_cfg = dataclasses.replace(cfg.sample, max_new_tokens=new_tokens)
    tokens, lengths = generate(params, prompts, jax.random.key(cfg.sample.seed), sample_cfg, cfg.model,
                               eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [tok.decode(p + list(np.asarray(t[:l]))) for p, t, l in zip(prompts, tokens, lengths)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_jax.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 model.d_model=128")
    p.add_argument("--fresh", action="store_true", help="start over: move an existing run dir aside first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-samples", action="store_true", help="skip the samples in the final summary")
    p.add_argument("--dry-run", action="store_true",
                   help="compile the train step ahead of time and print its memory per device; no data, no files")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (or ATLAS_COMPILE_CACHE=0)")
    p.add_argument("--coordinator", help="host:port of process 0, for multi-process runs (or ATLAS_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="number of processes (or ATLAS_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="this process's index (or ATLAS_PROCESS_ID)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    compile_cache.setup(not args.no_compile_cache)
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.dry_run:
        report = dry_run_report(cfg, dry_run(cfg))
        if _is_main():
            print(report)
        return 0
    result = train(cfg, fresh=args.fresh, progress=not args.no_progress)
    samples = None
    cfg = result.cfg or cfg
    if not args.no_samples and result.stopped == "done":
        samples = _samples(result, cfg)
    if _is_main():
        print(summary(result, cfg, samples))
    if result.stopped == "interrupted":
        _log(f"interrupted at step {result.step}; checkpoint saved; run the same command to resume")
        return 130
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
