"""`bench moe`: train steps of a mixture-of-experts llama (model.moe_experts=8, 2 per token by
default) against the dense llama with the same active parameters, and the MoE expert compute
`grouped` vs `ragged` vs `dense` dispatch (model.moe_impl), side by side in one invocation, each in a
fresh child process through atlas_jax's jitted train step (bench.train.train_atlas_jax): ms/step,
tokens/s, peak RSS, total and active params.

The dense baseline's d_ff is the one whose FFN params equal a MoE layer's active ones (k experts of
moe_d_ff and the D x E router): d_ff = round((3*k*F + E) / 3).
"""
from __future__ import annotations

import dataclasses

from atlas_jax.bench.common import BenchError, bench_config, in_child, load_avg, log, peak_flops
from atlas_jax.bench.train import summarize_train, train_atlas_jax

IMPLS = ("grouped", "ragged", "dense")  # model.moe_impl, the expert compute
MOE_DEFAULTS = ["model.moe_experts=8", "model.moe_experts_per_token=2"]


def dense_twin(moe_cfg):
    """The dense model with a MoE config's active FFN params: d_ff = round(k*F + E/3)."""
    m = moe_cfg.model
    d_ff = round(m.moe_experts_per_token * m.moe_d_ff + m.moe_experts / 3)
    return dataclasses.replace(moe_cfg, model=dataclasses.replace(m, moe_experts=0, d_ff=d_ff))


def cmd_moe(args) -> dict:
    from atlas_jax.config import resolve
    from atlas_jax.model import count_params_from_config, flops_per_token

    cfg, source = bench_config(args, extra=MOE_DEFAULTS)  # the overrides come after, so they win
    if cfg.model.moe_experts == 0:
        raise BenchError("moe: model.moe_experts=0 is the dense model; give model.moe_experts >= 1 (default 8)")
    b, t = cfg.train.batch_size, cfg.data.seq_len
    steps, warmup = args.steps or (3 if args.quick else 10), args.warmup or (1 if args.quick else 2)
    peak, peak_src, _ = peak_flops(args.quick)  # the table reports no utilisation, only time
    dense = resolve(dense_twin(cfg))
    rows = {f"dense d_ff={dense.model.d_ff}": dense}
    rows.update({f"moe {impl}": resolve(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_impl=impl)))
                 for impl in IMPLS})
    m = cfg.model
    section = {"config": source, "batch_size": b, "seq_len": t, "microbatches": cfg.train.microbatches,
               "d_model": m.d_model, "n_layers": m.n_layers, "moe_experts": m.moe_experts,
               "moe_experts_per_token": m.moe_experts_per_token, "moe_d_ff": m.moe_d_ff,
               "steps": steps, "warmup": warmup, "peak_flops": peak, "peak_source": peak_src,
               "load_avg_start": load_avg(), "rows": {}}
    log(f"moe: {source or 'flags'}, E={m.moe_experts} k={m.moe_experts_per_token} F={m.moe_d_ff}, batch {b} x seq "
        f"{t}, {steps} steps after {warmup} warm-up")
    for name, c in rows.items():
        counts = count_params_from_config(c.model)
        got = in_child(train_atlas_jax, cfg=dataclasses.asdict(c), steps=steps, warmup=warmup)
        r = summarize_train(got, b * t, flops_per_token(c.model, t), peak)
        r.update(params_total=counts["total"], params_active=counts["active"])
        section["rows"][name] = r
        log(f"  {name}: " + (r["error"] if "error" in r else
                              f"{r['step_s_median'] * 1e3:,.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
                              f"params {counts['total']:,} total / {counts['active']:,} active"))
    base = section["rows"][next(iter(rows))].get("step_s_median")
    for r in section["rows"].values():
        if base and "step_s_median" in r:
            r["time_vs_dense"] = float(r["step_s_median"] / base)
    section["load_avg_end"] = load_avg()
    return section
