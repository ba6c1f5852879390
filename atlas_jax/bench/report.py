"""The bench reports: docs/benchmarks.json (one section per subcommand, merged across runs), its
markdown tables between the `bench:begin/end` markers, and the scaling plot."""
from __future__ import annotations

import json
from pathlib import Path

from atlas_jax.bench.common import machine, versions

MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def plot_scaling(section: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for fw, style in (("atlas_jax", "o-"), ("torch_eager", "s--")):
        pts = [(p["seq_len"], p[fw]["tokens_per_s"]) for p in section["seq_len"] if "tokens_per_s" in p.get(fw, {})]
        if pts:
            ax1.plot(*zip(*pts), style, label=fw)
        pts = [(p["params"], p[fw]["tokens_per_s"]) for p in section["params"] if "tokens_per_s" in p.get(fw, {})]
        if pts:
            ax2.plot(*zip(*pts), style, label=fw)
    ax1.set(xlabel="sequence length", ylabel="training tokens/s",
            title=f"sequence length ({section['tokens_per_step']} tokens/step)")
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(bottom=0)
    ax2.set(xscale="log", yscale="log", xlabel="parameters", ylabel="training tokens/s", title="model size")
    for p in section["params"]:
        if "tokens_per_s" in p.get("atlas_jax", {}):
            ax2.annotate(p["name"], (p["params"], p["atlas_jax"]["tokens_per_s"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown and JSON


def _fmt(x, digits: int = 0, suffix: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(r) + " |" for r in [header, align] + rows]


def _md_train(tr: dict) -> list[str]:
    m = tr["model"]
    rows = []
    for fw, r in tr["frameworks"].items():
        if "error" in r:
            rows.append([fw, f"error: {r['error']}"] + [""] * 7)
            continue
        mem = _fmt(r.get("peak_rss_mib"))
        if r.get("peak_device_mib"):
            mem += f" (device {_fmt(r['peak_device_mib'])})"
        per_round = " / ".join(f"{x * 1e3:.0f}" for x in r.get("round_medians", []))
        rows.append([fw, _fmt(r["step_s_median"] * 1e3, 1), per_round, _fmt(r["tokens_per_s"]), f"{r['mfu']:.1%}",
                     mem, _fmt(r["compile_s"], 1), f"{r['first_loss']:.4f}", _fmt(r.get("atlas_jax_speedup"), 2, "x")])
    return [f"### train: {tr['config'] or 'flags'}", "", f"`{tr['command']}`  ",
            f"{m['arch']}, d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']}/{m['n_kv_heads']} heads, "
            f"vocab {m['vocab_size']}, {m['params']:,} params; batch {tr['batch_size']} x seq {tr['seq_len']}; "
            f"dropout 0 (the torch twin has none) except in a 'dropout' row; torch accumulates "
            f"train.microbatches={tr.get('microbatches', 1)} as atlas_jax does except in a 'microbatches 1' row. "
            f"Median of {tr['steps']} steps after {tr['warmup']} warm-up in each of {tr.get('rounds', 1)} rounds "
            f"(a fresh process per framework per round, frameworks interleaved). MFU against {tr['peak_flops'] / 1e9:,.1f} GFLOP/s ({tr['peak_source']}). "
            f"Load average {tr['load_avg_start']} -> {tr['load_avg_end']}.", ""] + _table(
        ["framework", "step (ms)", "per round (ms)", "tokens/s", "MFU", "peak RSS (MiB)", "compile (s)", "first loss",
         "atlas_jax speed-up"], rows) + [""]


def _md_decode(de: dict) -> list[str]:
    m = de["model"]
    rows = []
    for name, r in de["frameworks"].items():
        if "error" in r:
            rows.append([name, f"error: {r['error']}"] + [""] * 5)
            continue
        for key, row in r["results"].items():
            same = row.get("greedy_same_prefix")
            rows.append([name, key.split("_")[1], _fmt(row["prefill_tokens_per_s"]), _fmt(row["decode_tokens_per_s"]),
                         _fmt(r.get("peak_rss_mib")), _fmt(row.get("atlas_jax_decode_speedup"), 2, "x"),
                         "-" if same is None else f"{same}/{de['new_tokens']}"])
    return [f"### decode: {de['config'] or 'flags'}", "", f"`{de['command']}`  ",
            f"{m['arch']}, d_model {m['d_model']}, {m['n_layers']} layers, vocab {m['vocab_size']}, {m['params']:,} "
            f"params; greedy, prompt {de['prompt_len']} tokens + {de['new_tokens']} new per sequence, median of "
            f"{de['reps']}. Decode tokens/s = batch x new tokens / (generate - prefill) for atlas_jax, / the decode "
            f"loop for llama.cpp ({de['llamacpp_threads']} threads, f32 KV cache, batch B = B sequences in one "
            f"llama_batch). Load average {de['load_avg_start']} -> {de['load_avg_end']}.", ""] + _table(
        ["engine", "batch", "prefill tokens/s", "decode tokens/s", "peak RSS (MiB)", "atlas_jax decode speed-up",
         "same greedy tokens (row 0)"], rows) + [""]


def _md_scaling(sc: dict) -> list[str]:
    rows = []
    for p in sc["seq_len"] + sc["params"]:
        label = p.get("name") or f"seq {p['seq_len']}"
        if "skipped" in p:
            rows.append([label, f"skipped: {p['skipped']}"] + [""] * 6)
            continue
        a, t = p.get("atlas_jax", {}), p.get("torch_eager", {})
        speedup = a["tokens_per_s"] / t["tokens_per_s"] if "tokens_per_s" in a and "tokens_per_s" in t else None
        rows.append([label + (f" ({p['note']})" if p.get("note") else ""), _fmt(p["params"]),
                     f"{p['batch_size']} x {p['seq_len']}", str(p.get("microbatches", 1)),
                     a.get("error") or _fmt(a.get("tokens_per_s")),
                     f"{a['mfu']:.1%}" if "mfu" in a else "-", t.get("error") or _fmt(t.get("tokens_per_s")),
                     _fmt(speedup, 2, "x")])
    return ["### scaling", "", f"`{sc['command']}`  ",
            f"{sc['tokens_per_step']} tokens per step (batch x seq), median of {sc['steps']} steps after "
            f"{sc['warmup']} warm-up, {' '.join(sc['dtype'])}, dropout 0; train.microbatches per point is the "
            f"fastest for atlas_jax of 1/2/4/8/16 (two timed steps each; both frameworks then use it); sequence points use "
            f"{sc['seq_config'] or 'the flag sizes'}. MFU against {sc['peak_flops'] / 1e9:,.1f} GFLOP/s. "
            f"Load average {sc['load_avg_start']} -> {sc['load_avg_end']}. Plot: `{sc.get('png')}`.", ""] + _table(
        ["point", "params", "batch x seq", "microbatches", "atlas_jax tokens/s", "MFU", "torch eager tokens/s", "atlas_jax speed-up"],
        rows) + [""]


def _md_quality(q: dict) -> list[str]:
    rows = []
    base = q["types"].get("f32", {}).get("ppl_llamacpp")
    for name, r in q["types"].items():
        change = f"{r['ppl_llamacpp'] / base - 1:+.2%}" if base else ""
        rows.append([name, f"{r['bytes'] / 2**20:.2f}", f"{r['max_abs']:.3g}", f"{r['top1']:.2%}",
                     f"{r['ppl_llamacpp']:.3f}", change, "yes" if r.get("greedy_match") else "no"])
    atlas_ppl = next(iter(q["types"].values()))["ppl_atlas"] if q["types"] else float("nan")
    return [f"### quality: {q['checkpoint']}", "", f"`{q['command']}`  ",
            f"Each type exported from the same checkpoint and run in llama.cpp (llama-cpp-python, f32 KV cache) on "
            f"{q['n_windows']} windows from the head of the validation split; atlas_jax float32 is the reference "
            f"(perplexity {atlas_ppl:.3f}). top-1: positions whose argmax agrees with atlas_jax. q4_0 is GPTQ "
            f"calibrated on the train split (the default of to_gguf.py), q4_0-rtn rounds each weight "
            f"(`--no-calibrate`); both keep the output projection at q8_0. The K-quants come from llama.cpp's "
            f"quantizer; rows that do not split into its 256-blocks fall back per tensor.", ""] + _table(
        ["type", "size (MiB)", "max abs dlogit", "top-1", "ppl (llama.cpp)", "vs f32", "greedy 32 = atlas_jax"],
        rows) + [""]


def render_markdown(data: dict) -> str:
    mach, ver = data.get("machine", {}), data.get("versions", {})
    lines = [f"Machine: {mach.get('cpu')}, {mach.get('cores')} cores, {mach.get('memory_gib')} GiB; jax backend "
             f"{mach.get('jax_backend')} ({mach.get('device_kind')} x{mach.get('device_count')}).",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) + ".", ""]
    for name, render in (("train", _md_train), ("decode", _md_decode), ("scaling", _md_scaling),
                         ("quality", _md_quality)):
        if name in data:
            lines += render(data[name])
            if data[name].get("env"):
                lines += ["Environment: " + ", ".join(f"`{k}={v}`" for k, v in data[name]["env"].items()), ""]
    return "\n".join(lines)


def write_outputs(section_name: str, section: dict, out: Path, md: Path) -> dict:
    data = {}
    if out.is_file():
        try:
            data = json.loads(out.read_text())
        except json.JSONDecodeError:
            data = {}
    data.update({"machine": machine(), "versions": versions(), section_name: section})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    table = render_markdown(data)
    note = f"<!-- written by scripts/bench.py from {out.name}; edits between the markers are replaced -->"
    block = f"{MARK_BEGIN}\n{note}\n\n{table}\n{MARK_END}"
    text = md.read_text() if md.is_file() else "# Benchmarks\n\n"
    if MARK_BEGIN in text and MARK_END in text:
        text = text[:text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    return data
