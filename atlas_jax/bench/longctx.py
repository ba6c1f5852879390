"""`bench longctx`: atlas_jax training tokens/s, peak RSS and the attention's compiled temporaries
as the sequence grows at a fixed number of tokens per step, for each model.attention given
(default einsum against blocked, the FlashAttention-2 style kernel); the plot is report.plot_longctx's."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from atlas_jax.bench.common import REPO, bench_config, in_child, load_avg, log, peak_flops
from atlas_jax.bench.report import plot_longctx
from atlas_jax.bench.train import summarize_train, train_atlas_jax

LONGCTX_ATTENTIONS = ("einsum", "blocked", "xla")


def attention_temp_bytes(cfg) -> int:
    """XLA's temporaries for one layer's attention value-and-grad at the step's shape (batch x seq at
    the config's heads): the [T, S] scores for einsum, O(T * block) for blocked. Compiled, not run."""
    import jax
    import jax.numpy as jnp

    from atlas_jax.model import attention, attention_impl

    m, b, t = cfg.model, cfg.train.batch_size // cfg.train.microbatches, cfg.data.seq_len
    q = jax.ShapeDtypeStruct((b, t, m.n_heads, m.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, m.n_kv_heads, m.head_dim), jnp.float32)
    impl = attention_impl(m, t)
    f = jax.value_and_grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl, block=m.attention_block)), (0, 1, 2))
    return int(jax.jit(f).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes)


def cmd_longctx(args) -> dict:
    from atlas_jax.model import flops_per_token

    steps, warmup = args.steps or (1 if args.quick else 3), args.warmup or 1
    seq_lens = args.seq_lens or ([32, 64] if args.quick else [256, 512, 1024, 2048, 4096])
    tokens = args.tokens_per_step or (128 if args.quick else 8192)
    impls = args.attention
    png = Path(args.png) if args.png else Path(args.out).with_name("longctx.png")
    peak, peak_src, mfu_label = peak_flops(args.quick)
    _, source = bench_config(args)
    section = {"config": source, "tokens_per_step": tokens, "attention": impls, "steps": steps, "warmup": warmup,
               "peak_flops": peak, "peak_source": peak_src, "mfu_label": mfu_label,
               "load_avg_start": load_avg(), "points": []}
    log(f"longctx: {tokens} tokens per step; seq lengths {seq_lens}; attention {impls} ({source or 'flags'})")
    for t in seq_lens:
        point = {"seq_len": t}
        if tokens % t:
            point["skipped"] = f"{t} does not divide --tokens-per-step {tokens}"
            section["points"].append(point)
            continue
        for impl in impls:
            cfg, _ = bench_config(args, extra=["model.compute_dtype=float32", f"model.attention={impl}",
                                               f"model.max_seq_len={t}", f"data.seq_len={t}",
                                               f"train.batch_size={tokens // t}", "train.microbatches=1"])
            point["batch_size"] = cfg.train.batch_size
            if impl == "blocked":  # the block the kernel runs (model.attention_block None: kernels.auto_block)
                from atlas_jax.kernels import auto_block
                point["block"] = cfg.model.attention_block or auto_block(
                    cfg.train.batch_size // cfg.train.microbatches, cfg.model.n_heads, t)
            point.setdefault("flops_per_token", flops_per_token(cfg.model, t))
            raw = in_child(train_atlas_jax, cfg=dataclasses.asdict(cfg), steps=steps, warmup=warmup)
            r = summarize_train(raw, tokens, point["flops_per_token"], peak)
            if "error" not in r:
                r["attention_temp_bytes"] = attention_temp_bytes(cfg)
            point[impl] = r
            log(f"  seq {t} {impl}: " + (r["error"] if "error" in r else
                                         f"{r['tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss_mib']:,.0f} MiB, "
                                         f"attention temporaries {r['attention_temp_bytes'] / 2**20:,.1f} MiB"))
        section["points"].append(point)
    section["load_avg_end"] = load_avg()
    plot_longctx(section, png)
    section["png"] = str(png.resolve().relative_to(REPO)) if png.resolve().is_relative_to(REPO) else str(png)
    return section
