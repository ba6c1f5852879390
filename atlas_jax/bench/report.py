"""The bench reports: docs/benchmarks.json (one section per subcommand, merged across runs), its
markdown tables between the `bench:begin/end` markers, and the scaling plot."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from atlas_jax.bench.common import BenchError, machine, versions

MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"
SECTIONS = ("train", "decode", "scaling", "quality")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- output files, checked first


def _check_place(path: Path, flag: str, suffix: str) -> None:
    """`path` names a `suffix` file (not a directory) in an existing directory that takes new files."""
    if path.is_dir():
        raise BenchError(f"{flag} {path}: is a directory; give a file name, e.g. {flag} {path / ('bench' + suffix)}")
    if path.suffix != suffix:
        raise BenchError(f"{flag} {path}: not a {suffix} name; give a file ending in {suffix}")
    parent = path.parent
    if not parent.exists():
        raise BenchError(f"{flag} {path}: the directory {parent} does not exist; create it or choose another {flag}")
    if not parent.is_dir():
        raise BenchError(f"{flag} {path}: {parent} is not a directory; choose another {flag}")
    try:  # what writing will do: a new file beside it (the temporary that is renamed)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BenchError(f"{flag} {path}: cannot write in {parent} ({e.strerror or type(e).__name__}); "
                         f"fix its permissions or choose another {flag}") from None


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"{flag} {path}: the file is not UTF-8 text (byte {e.start}); it is not a bench "
                         f"file, choose another {flag}") from None
    except OSError as e:
        raise BenchError(f"{flag} {path}: cannot read it ({e.strerror or type(e).__name__})") from None


def read_results(out: Path, flag: str = "--out") -> dict:
    """The results already in `out` ({} when it is new); a file that is not bench results is refused,
    never replaced (results merge into --out)."""
    if not out.exists():
        return {}
    if not out.is_file():
        raise BenchError(f"{flag} {out}: not a regular file; choose another {flag}")
    text = _read_text(out, flag)
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise BenchError(f"{flag} {out}: exists and is not JSON (line {e.lineno}: {e.msg}), so not bench results; "
                         f"results merge into --out and never replace another file: choose another {flag}") from None
    # bench results are an object of sections (machine, versions, one per subcommand), each an object
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BenchError(f"{flag} {out}: exists and holds no bench results (a JSON object of sections such as "
                         f"machine, {', '.join(SECTIONS)}); results merge into --out and never replace another "
                         f"file: choose another {flag}")
    return data


def _check_markers(text: str, md: Path, flag: str) -> None:
    begin, end = text.count(MARK_BEGIN), text.count(MARK_END)
    if (begin, end) not in ((0, 0), (1, 1)) or (begin and text.index(MARK_BEGIN) > text.index(MARK_END)):
        raise BenchError(f"{flag} {md}: holds {begin} '{MARK_BEGIN}' and {end} '{MARK_END}' markers (or out of "
                         f"order); the tables go between one pair: fix the markers or choose another {flag}")


def check_outputs(out: Path, md: Path, md_given: bool = True) -> None:
    """--out and --md, before anything is measured: each a file name of its kind in a writable
    directory; an existing --out must hold bench results, an existing --md must be UTF-8 with at
    most one pair of markers; and they are two files."""
    _check_place(out, "--out", ".json")
    md_flag = "--md" if md_given else "--md (default, --out with .md)"
    _check_place(md, md_flag, ".md")
    if out.resolve() == md.resolve():
        raise BenchError(f"--md {md}: is the --out file; give two files")
    read_results(out)
    if md.exists():
        if not md.is_file():
            raise BenchError(f"{md_flag} {md}: not a regular file; choose another --md")
        _check_markers(_read_text(md, md_flag), md, md_flag)


def check_png(png: Path, flag: str = "--png") -> None:
    """The scaling plot: a .png name in a writable directory; an existing file is replaced only when it
    is a PNG (an earlier plot)."""
    _check_place(png, flag, ".png")
    if png.exists():
        try:
            with open(png, "rb") as f:
                is_png = png.is_file() and f.read(len(PNG_MAGIC)) == PNG_MAGIC
        except OSError:
            is_png = False
        if not is_png:
            raise BenchError(f"{flag} {png}: exists and is not a PNG image; it is never replaced, "
                             f"choose another {flag}")


def _file_mode(path: Path) -> int:
    """The mode a replaced file keeps, or a new file's (0666 less the umask; mkstemp would give 0600)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_atomic(path: Path, data: bytes) -> Path:
    """`data` into a temporary beside `path` (fsynced); returns it, to be renamed over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


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
    _save_png(fig, png)


def _save_png(fig, png: Path) -> None:
    """fig written to png under a temporary name, then renamed; the figure is closed."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".png")
    os.fchmod(fd, _file_mode(png))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, png)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BenchError(f"--png {png}: writing the plot failed ({e.strerror or e}); nothing was replaced") from None
    finally:
        plt.close(fig)


def plot_longctx(section: dict, png: Path) -> None:
    """Training tokens/s and peak RSS against sequence length, one line per model.attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for impl in section["attention"]:
        ok = [p for p in section["points"] if "tokens_per_s" in p.get(impl, {})]
        if ok:
            ax1.plot([p["seq_len"] for p in ok], [p[impl]["tokens_per_s"] for p in ok], "o-", label=impl)
            ax2.plot([p["seq_len"] for p in ok], [p[impl]["peak_rss_mib"] for p in ok], "o-", label=impl)
    ax1.set(xlabel="sequence length", ylabel="training tokens/s",
            title=f"model.attention ({section['tokens_per_step']} tokens/step)")
    ax2.set(xlabel="sequence length", ylabel="peak RSS (MiB)", title="memory")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    _save_png(fig, png)


# --------------------------------------------------------------------------- markdown and JSON


def _fmt(x, digits: int = 0, suffix: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(r) + " |" for r in [header, align] + rows]


def _peak_text(tr: dict) -> str:
    """What the MFU column divides by: one peak, or on a CPU each framework's own measured matmul."""
    label = tr.get("mfu_label", "MFU")
    text = f"{label} against {tr['peak_flops'] / 1e9:,.1f} GFLOP/s ({tr['peak_source']})"
    if tr.get("peak_source_torch", tr["peak_source"]) != tr["peak_source"]:
        text += (f" for atlas_jax rows and {tr['peak_flops_torch'] / 1e9:,.1f} GFLOP/s ({tr['peak_source_torch']}) "
                 f"for torch rows")
    if "peak_flops_bf16" in tr:
        text += (f"; the bf16 rows against {tr['peak_flops_bf16'] / 1e9:,.1f} GFLOP/s ({tr['peak_source_bf16']}, "
                 f"accumulating in f32) for atlas_jax and {tr['peak_flops_torch_bf16'] / 1e9:,.1f} GFLOP/s "
                 f"({tr['peak_source_torch_bf16']}) for torch")
    return text + "."


def _torch_settings_text(tr: dict) -> str:
    """'torch_best: attention=sdpa, compile=step; ...': the train_torch settings of each torch row."""
    rows = [f"{fw}: " + (", ".join(f"{k}={v}" for k, v in kw.items()) or "eager, attention=math")
            for fw, kw in tr.get("torch_settings", {}).items()]
    return f"Torch settings (bench/train.py TORCH_SETTINGS): {'; '.join(rows)}. " if rows else ""


def _md_train(tr: dict) -> list[str]:
    m = tr["model"]
    rows = []
    for fw, r in tr["frameworks"].items():
        if "error" in r:
            rows.append([fw, f"error: {r['error']}"] + [""] * 7)
            continue
        mem = _fmt(r.get("peak_rss_mib"))
        if r.get("rss_end_mib"):  # the peak holds the compile; the end is what the running loop holds
            mem += f" / {_fmt(r['rss_end_mib'])}"
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
            f"(a fresh process per framework per round, frameworks interleaved). {_torch_settings_text(tr)}"
            f"{_peak_text(tr)} "
            f"Load average {tr['load_avg_start']} -> {tr['load_avg_end']}.", ""] + _table(
        ["framework", "step (ms)", "per round (ms)", "tokens/s", tr.get("mfu_label", "MFU"), "RSS peak / after steps (MiB)", "compile (s)",
         "first loss", "atlas_jax speed-up"], rows) + [""]


_TOOLS_NOTE = ["llama-bench / llama-batched-bench rows: llama.cpp's own tools, as it ships (its defaults but the "
               "sizes and threads), on the same GGUF file; tokens/s are theirs (llama-bench avg_ts; batched-bench "
               "S_PP and S_TG, median over reps after one warm-up run); they decode random tokens, so no greedy "
               "comparison. Commands:", ""]


def _md_decode(de: dict) -> list[str]:
    m = de["model"]
    rows = []
    tools = []  # llama.cpp's own tools: each run's command and settings, under the table
    for name, r in de["frameworks"].items():
        if "error" in r or "skipped" in r:
            rows.append([name, f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"] + [""] * 5)
            continue
        if "command" in r:
            tools.append(f"- {name}: KV cache {r['kv_cache']}, flash_attn {r.get('flash_attn')}, n_batch "
                         f"{r.get('n_batch')}/n_ubatch {r.get('n_ubatch')}, extra buffer types {r['extra_bufts']}"
                         + (f"; {r['note']}" if r.get("note") else "") + ": "
                         + "; ".join(f"`{c}`" for c in (r.get("commands") or {"": r["command"]}).values()))
        for key, row in r["results"].items():
            same = row.get("greedy_same_prefix")
            engine = f"{name} ({row['kernel_layout']} kernels)" if "kernel_layout" in row else name
            rows.append([engine, key.split("_")[1], _fmt(row["prefill_tokens_per_s"]), _fmt(row["decode_tokens_per_s"]),
                         _fmt(row.get("peak_rss_mib", r.get("peak_rss_mib"))), _fmt(row.get("atlas_jax_decode_speedup"), 2, "x"),
                         "-" if same is None else f"{same}/{de['new_tokens']}"])
    return [f"### decode: {de['config'] or 'flags'}", "", f"`{de['command']}`  ",
            f"{m['arch']}, d_model {m['d_model']}, {m['n_layers']} layers, vocab {m['vocab_size']}, {m['params']:,} "
            f"params; greedy, prompt {de['prompt_len']} tokens + {de['new_tokens']} new per sequence, median of "
            f"{de['reps']}. Decode tokens/s = batch x new tokens / (generate - prefill) for atlas_jax, / the decode "
            f"loop for the 'llama.cpp <type>' rows (llama-cpp-python's batch API, {de['llamacpp_threads']} threads, "
            f"f32 KV cache, batch B = B sequences in one llama_batch; llama.cpp's own tools below the table). "
            f"Load average {de['load_avg_start']} -> {de['load_avg_end']}.", ""] + _table(
        ["engine", "batch", "prefill tokens/s", "decode tokens/s", "peak RSS (MiB)", "atlas_jax decode speed-up",
         "same greedy tokens (row 0)"], rows) + ([""] + _TOOLS_NOTE + tools if tools else []) + [""]


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
            f"{sc['seq_config'] or 'the flag sizes'}. {sc.get('mfu_label', 'MFU')} against {sc['peak_flops'] / 1e9:,.1f} GFLOP/s "
            f"({sc.get('peak_source', 'see peak_source')}). "
            f"Load average {sc['load_avg_start']} -> {sc['load_avg_end']}. Plot: `{sc.get('png')}`.", ""] + _table(
        ["point", "params", "batch x seq", "microbatches", "atlas_jax tokens/s", sc.get("mfu_label", "MFU"),
         "torch eager tokens/s", "atlas_jax speed-up"],
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


def _md_hf(h: dict) -> list[str]:
    rows = [[r["job"], f"{r['seconds']:.2f}", f"{r['peak_rss_mib']:,.0f}", f"{r['peak_rss_over_weights']:.2f}"]
            for r in h["rows"]]
    return ["### hf: Hugging Face import / export", "", f"`{h['command']}`  ",
            f"A random GPT2LMHeadModel ({h['params']:,} params, {h['float32_weights_mib']:,.0f} MiB in float32) saved "
            f"by transformers; each job in a fresh process (peak RSS includes the libraries: see the 'libraries "
            f"only' rows). Load average {h['load_avg_start']} -> {h['load_avg_end']}.", ""] + _table(
        ["job", "seconds", "peak RSS (MiB)", "peak RSS / float32 weights"], rows) + [""]


def _md_finetune(f: dict) -> list[str]:
    full = f["rows"][0]
    rows = [[r["row"], f"{r['trainable']:,}", f"{r['opt_state_bytes'] / 2**20:,.1f}",
             f"{(r['base_bytes'] or 0) / 2**20:,.1f}", f"{r['step_s']:.3f}", f"{full['step_s'] / r['step_s']:.2f}x",
             f"{r['peak_rss_mib']:,.0f}"] for r in f["rows"]]
    return ["### finetune: full vs LoRA vs QLoRA-style", "", f"`{f['command']}`  ",
            f"{f['config']} with {' '.join(f['overrides'])}; random weights, {f['steps']} timed steps (median). "
            f"Load average {f['load_avg_start']} -> {f['load_avg_end']}.", ""] + _table(
        ["row", "trainable params", "optimizer state (MiB)", "frozen base (MiB)", "step (s)", "speed vs full",
         "peak RSS (MiB)"], rows) + [""]


def _md_moe(mo: dict) -> list[str]:
    rows = []
    for name, r in mo["rows"].items():
        if "error" in r:
            rows.append([name, f"error: {r['error']}"] + [""] * 6)
            continue
        rows.append([name, f"{r['params_total']:,}", f"{r['params_active']:,}", _fmt(r["step_s_median"] * 1e3, 1),
                     _fmt(r["tokens_per_s"]), _fmt(r.get("peak_rss_mib")), _fmt(r.get("time_vs_dense"), 2, "x"),
                     f"{r['first_loss']:.4f}"])
    return [f"### moe: {mo['config'] or 'flags'}", "", f"`{mo['command']}`  ",
            f"d_model {mo['d_model']}, {mo['n_layers']} layers; MoE: {mo['moe_experts']} experts, "
            f"{mo['moe_experts_per_token']} per token, expert d_ff {mo['moe_d_ff']}, against the dense model with "
            f"the same active params. Batch {mo['batch_size']} x seq {mo['seq_len']} in {mo['microbatches']} "
            f"microbatches, dropout 0; median of {mo['steps']} steps after {mo['warmup']} warm-up, each row in a "
            f"fresh process. Load average {mo['load_avg_start']} -> {mo['load_avg_end']}.", ""] + _table(
        ["model", "params", "active params", "step (ms)", "tokens/s", "peak RSS (MiB)", "time vs dense",
         "first loss"], rows) + [""]


def _md_longctx(lc: dict) -> list[str]:
    impls, rows = lc["attention"], []
    for p in lc["points"]:
        if "skipped" in p:
            rows.append([f"seq {p['seq_len']}", f"skipped: {p['skipped']}"] + [""] * (3 * len(impls)))
            continue
        cells = [f"seq {p['seq_len']}", f"{p['batch_size']} x {p['seq_len']}"
                 + (f", block {p['block']}" if "block" in p else "")]
        for impl in impls:
            r = p.get(impl, {})
            cells += [r.get("error") or _fmt(r.get("tokens_per_s")), _fmt(r.get("peak_rss_mib")),
                      _fmt(r["attention_temp_bytes"] / 2**20, 1) if "attention_temp_bytes" in r else "-"]
        base = p.get(impls[0], {}).get("tokens_per_s")
        cells += [_fmt(p.get(i, {}).get("tokens_per_s", 0) / base if base and "tokens_per_s" in p.get(i, {}) else None,
                       2, "x") for i in impls[1:]]
        rows.append(cells)
    header = ["point", "batch x seq"]
    for impl in impls:
        header += [f"{impl} tokens/s", f"{impl} peak RSS (MiB)", f"{impl} attention temp (MiB)"]
    header += [f"{i} vs {impls[0]}" for i in impls[1:]]
    return ["### longctx", "", f"`{lc['command']}`  ",
            f"{lc['tokens_per_step']} tokens per step (batch x seq, 1 microbatch), model.attention "
            f"{', '.join(impls)}, float32, dropout 0; median of {lc['steps']} steps after {lc['warmup']} warm-up, "
            f"each in a fresh process (its own peak RSS); attention temp: XLA's compiled temporaries of one "
            f"layer's attention value-and-grad at that shape; config {lc['config'] or 'the flag sizes'}. "
            f"Load average {lc['load_avg_start']} -> {lc['load_avg_end']}. Plot: `{lc.get('png')}`.", ""] + _table(
        header, rows) + [""]


def render_markdown(data: dict) -> str:
    mach, ver = data.get("machine", {}), data.get("versions", {})
    lines = [f"Machine: {mach.get('cpu')}, {mach.get('cores')} cores, {mach.get('memory_gib')} GiB; jax backend "
             f"{mach.get('jax_backend')} ({mach.get('device_kind')} x{mach.get('device_count')}).",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) + ".", ""]
    for name, render in (("train", _md_train), ("decode", _md_decode), ("scaling", _md_scaling),
                         ("longctx", _md_longctx), ("quality", _md_quality), ("hf", _md_hf), ("finetune", _md_finetune),
                         ("moe", _md_moe)):
        if name in data:
            lines += render(data[name])
            if data[name].get("env"):
                lines += ["Environment: " + ", ".join(f"`{k}={v}`" for k, v in data[name]["env"].items()), ""]
    return "\n".join(lines)


def write_outputs(section_name: str, section: dict, out: Path, md: Path) -> dict:
    """Merge `section` into --out and re-render --md's marked block. Both are checked again (the files
    may have changed during the run), both written to temporaries, then renamed: a failure leaves
    both files as they were."""
    check_outputs(out, md)
    data = read_results(out)
    data.update({"machine": machine(), "versions": versions(), section_name: section})
    table = render_markdown(data)
    note = f"<!-- written by scripts/bench.py from {out.name}; edits between the markers are replaced -->"
    block = f"{MARK_BEGIN}\n{note}\n\n{table}\n{MARK_END}"
    text = _read_text(md, "--md") if md.is_file() else "# Benchmarks\n\n"
    if MARK_BEGIN in text and MARK_END in text:
        text = text[:text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    temps = []
    try:
        temps.append((_write_atomic(out, (json.dumps(data, indent=1, default=float) + "\n").encode()), out))
        temps.append((_write_atomic(md, text.encode("utf-8")), md))
        for tmp, final in temps:
            os.replace(tmp, final)
    except OSError as e:
        done = [str(final) for tmp, final in temps if not tmp.exists()]  # renamed already
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise BenchError(f"--out {out}: writing the results failed ({e.strerror or e}); "
                         + (f"only {done[0]} was updated" if done else f"{out} and {md} are as they were")
                         + "; free space or fix permissions and run the benchmark again") from None
    return data
