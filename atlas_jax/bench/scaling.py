"""`bench scaling`: atlas_jax (and torch eager) training tokens/s at a fixed number of tokens per
step as the sequence doubles and as the model grows; the plot is report.plot_scaling's."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from atlas_jax.bench.common import (REPO, SHAKESPEARE, TINY, BenchError, bench_config, in_child, load_avg, log,
                                    meminfo_kib, model_summary, peak_flops)
from atlas_jax.bench.report import check_png, plot_scaling
from atlas_jax.bench.train import summarize_train, torch_device, train_atlas_jax, train_torch, with_microbatches

SIZES = {"tiny": TINY, "shakespeare": SHAKESPEARE, "124M": REPO / "configs" / "gpt2-124m.yaml"}


def _pick_microbatches(cfg) -> tuple[int, dict[int, float]]:
    """The train.microbatches (1, 2, 4, 8 or 16, dividing the batch) with the fastest atlas_jax step,
    from two timed steps each: the best split trades per-op overhead (many small microbatches)
    against the XLA:CPU temporaries of a big one, and moves with the sequence length."""
    tried = {}
    for m in (1, 2, 4, 8, 16):
        if cfg.train.batch_size % m == 0:
            raw = in_child(train_atlas_jax, cfg=dataclasses.asdict(with_microbatches(cfg, m)), steps=2, warmup=1)
            if "error" not in raw:
                tried[m] = float(np.median(raw["step_s"]))
    return (min(tried, key=tried.get) if tried else cfg.train.microbatches), tried


def _train_point(cfg, steps: int, warmup: int, with_torch: bool, peak: float, tune: bool = False,
                 torch_peak: float | None = None) -> dict:
    """atlas_jax (and torch eager) at one size; tune: first pick train.microbatches for atlas_jax
    (`_pick_microbatches`), which both frameworks then use. torch's utilisation is against `torch_peak`
    (its own measured matmul on a CPU) when given."""
    from atlas_jax.model import flops_per_token

    b, t = cfg.train.batch_size, cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, t)
    point = {"batch_size": b, "seq_len": t, "params": model_summary(cfg)["params"],
             "flops_per_token": flops_tok}
    if tune:
        best, point["microbatch_step_s"] = _pick_microbatches(cfg)
        cfg = with_microbatches(cfg, best)
    point["microbatches"] = cfg.train.microbatches
    raw = in_child(train_atlas_jax, cfg=dataclasses.asdict(cfg), steps=steps, warmup=warmup)
    point["atlas_jax"] = summarize_train(raw, b * t, flops_tok, peak)
    if with_torch:
        raw = in_child(train_torch, cfg=dataclasses.asdict(cfg), steps=steps, warmup=warmup, compile="none",
                       device=torch_device())
        point["torch_eager"] = summarize_train(raw, b * t, flops_tok, torch_peak or peak)
    return point


def _fits_in_memory(cfg) -> tuple[bool, str]:
    """A rough host-memory estimate of one train step (CPU only): 20 bytes/param for params, grads and
    AdamW, plus float32 activations; compared with MemAvailable."""
    from atlas_jax.model import count_params_from_config

    m, tokens = cfg.model, cfg.train.batch_size * cfg.data.seq_len
    n = count_params_from_config(m)["total"]
    acts = tokens * 4 * (m.n_layers * (16 * m.d_model + 3 * m.d_ff + 2 * m.n_heads * cfg.data.seq_len)
                         + 3 * m.vocab_size)
    need, avail = 20 * n + acts, meminfo_kib("MemAvailable") * 1024
    return need < 0.8 * avail, f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"


def scaling_configs(args) -> list[tuple[str, Path]]:
    """(name, YAML path) of each --sizes entry, each read once now: a name that is neither a size nor
    a file, or a bad YAML, is one line before any measurement. A known size whose config is missing
    from the tree is kept (recorded as skipped)."""
    given = args.sizes or ("tiny,shakespeare" if args.quick else "tiny,shakespeare,124M")
    names = [n.strip() for n in given.split(",")]
    out = []
    for name in names:
        if not name:
            raise BenchError(f"--sizes {args.sizes}: an empty item; give a comma list of {', '.join(SIZES)} "
                             f"or YAML paths")
        path = SIZES.get(name, Path(name))
        if name not in SIZES and not path.is_file():
            raise BenchError(f"--sizes: '{name}' is no size ({', '.join(SIZES)}) and no YAML file; "
                             f"give one of those or a config path")
        if path.is_file():
            bench_config(argparse.Namespace(**{**vars(args), "config": str(path), "overrides": []}))
        out.append((name, path))
    return out


def cmd_scaling(args) -> dict:
    import jax

    cpu = jax.default_backend() == "cpu"
    steps, warmup = args.steps or (2 if args.quick else 5), args.warmup or 1
    seq_lens = args.seq_lens or ([32, 64] if args.quick else [256, 512, 1024, 2048])  # checked by the parser
    tokens = args.tokens_per_step or (256 if args.quick else 8192)
    sizes = scaling_configs(args)
    png = Path(args.png) if args.png else Path(args.out).with_name("scaling.png")
    check_png(png, "--png" if args.png else f"--png (default, beside --out {args.out})")
    peak, peak_src, mfu_label = peak_flops(args.quick)
    with_torch = (not args.quick) if args.torch is None else args.torch
    torch_peak, torch_src = (peak_flops(args.quick, framework="torch")[:2] if with_torch and torch_device() == "cpu"
                             else (peak, peak_src))
    # model.attention=auto: the grouped einsums on CPU, cuDNN on a GPU in bf16.
    dtype = [f"model.compute_dtype={'float32' if cpu else 'bfloat16'}", "model.attention=auto"]
    _, source = bench_config(args)
    section = {"seq_config": source, "tokens_per_step": tokens, "torch_eager": with_torch, "steps": steps,
               "warmup": warmup, "peak_flops": peak, "peak_source": peak_src, "mfu_label": mfu_label,
               "peak_flops_torch": torch_peak, "peak_source_torch": torch_src, "dtype": dtype,
               "load_avg_start": load_avg(), "seq_len": [], "params": []}
    log(f"scaling: {tokens} tokens per step; seq lengths {seq_lens} ({source or 'flags'}); "
        f"sizes {[name for name, _ in sizes]}")
    for t in seq_lens:
        if tokens % t:
            section["seq_len"].append({"seq_len": t, "skipped": f"{t} does not divide --tokens-per-step"})
            continue
        cfg, _ = bench_config(args, extra=dtype + [f"model.max_seq_len={t}", f"data.seq_len={t}",
                                                   f"train.batch_size={tokens // t}", "train.microbatches=1"])
        point = _train_point(cfg, steps, warmup, with_torch, peak, tune=not args.quick, torch_peak=torch_peak)
        section["seq_len"].append(point)
        log(f"  seq {t}: " + _point_line(point))
    t = seq_lens[0] if args.quick else 256
    for name, path in sizes:
        if not path.is_file():
            section["params"].append({"name": name, "skipped": f"{path}: no such config"})
            continue
        n_tokens = tokens
        note = None
        if name == "124M" and cpu:  # ~0.75 GFLOP per token: minutes per 8k-token step on a few cores
            n_tokens, note = min(tokens, 2048), "CPU: 2048 tokens per step (8 x 256), atlas_jax only"
        extra = dtype + [f"model.max_seq_len={max(t, 64)}", f"data.seq_len={t}",
                         f"train.batch_size={max(n_tokens // t, 1)}", "train.microbatches=1"]
        sized = argparse.Namespace(**{**vars(args), "config": str(path), "overrides": []})
        cfg, _ = bench_config(sized, extra=extra)
        ok, why = _fits_in_memory(cfg)
        if cpu and not ok:
            section["params"].append({"name": name, "skipped": f"not enough memory: {why}"})
            log(f"  {name}: skipped, {why}")
            continue
        point = {"name": name, **_train_point(cfg, steps, warmup, with_torch and note is None, peak,
                                              tune=not args.quick and note is None, torch_peak=torch_peak)}
        if note:
            point["note"] = note
        section["params"].append(point)
        log(f"  {name}: " + _point_line(point))
    section["load_avg_end"] = load_avg()
    plot_scaling(section, png)
    section["png"] = str(png.resolve().relative_to(REPO)) if png.resolve().is_relative_to(REPO) else str(png)
    return section


def _point_line(point: dict) -> str:
    parts = []
    for fw in ("atlas_jax", "torch_eager"):
        r = point.get(fw)
        if r:
            parts.append(f"{fw} " + (r["error"] if "error" in r else f"{r['tokens_per_s']:,.0f} tok/s"))
    return "; ".join(parts)
