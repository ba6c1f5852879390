"""Ablations: one config trained with each architecture toggle at an equal token budget, one after another.

    python -m atlas_jax.ablate --config configs/shakespeare.yaml [--tokens N] [--set default]
        [--toggles baseline,positions=none] [--runs runs/ablate] [--out docs/ablations.md] [--png PATH] [key=value ...]

Each toggle is a list of `section.key=value` overrides on top of the config (and of the overrides given
here, which apply to every run). Every run trains train.steps = --tokens // (batch_size * seq_len)
steps (the same steps x batch x seq_len for all), evaluates once at the end, and runs in its own child
process (`python -m atlas_jax.ablate --child`), so its peak memory is its own (the child's peak RSS,
from os.wait4). The table: val bits per byte (the trainer's: val nats / ln 2 over the val targets' UTF-8
bytes), val loss, tokens/s (after the first, compiling step), params total and active (MoE: k of E
experts), peak RSS, wall time. The runs share one prepared data directory (<runs>/data).
The default set: baseline, positions=learned, positions=none, norm=layer, mlp=gelu, a smaller
n_kv_heads, moe=4x2 and sinks=4 (model.sink_tokens=4: four learned sink vectors before every window).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from atlas_jax.config import Config, ConfigError, ModelConfig, apply_overrides, load_config, resolve, save_config
from atlas_jax.errors import AtlasError, run_cli

# The default budget: 200 steps of configs/shakespeare.yaml's 32 x 128 tokens, so that its 8 runs fit in
# 30 minutes on 2 CPU cores (docs/ablations.md has the measured wall time).
DEFAULT_TOKENS = 200 * 32 * 128


def default_toggles(m: ModelConfig) -> dict[str, list[str]]:
    """The default set for a resolved model `m`: the baseline and one change each."""
    kv = m.n_kv_heads // 2 if m.n_kv_heads % 2 == 0 and m.n_kv_heads > 1 else 1
    d_ff_moe = max(m.d_ff // 2, 1)  # 2 of 4 experts of half width: the dense MLP's active FFN params
    toggles = {
        "baseline": [],
        "positions=learned": ["model.positions=learned"],
        "positions=none": ["model.positions=none"],
        "norm=layer": ["model.norm=layer"],
        "mlp=gelu": ["model.mlp=gelu", "model.d_ff=null"],  # gelu's own width, 4*d_model: the same params
        f"n_kv_heads={kv}": [f"model.n_kv_heads={kv}"],
        "moe=4x2": ["model.moe_experts=4", "model.moe_experts_per_token=2", f"model.moe_d_ff={d_ff_moe}"],
        "sinks=4": ["model.sink_tokens=4"],
    }
    return toggles


SETS = {"default": default_toggles}


@dataclasses.dataclass
class Row:
    name: str
    overrides: list[str]
    val_bpb: float
    val_loss: float
    tokens_per_s: float
    params_total: int
    params_active: int
    peak_rss_mib: float
    wall_s: float


def plan(base: Config, toggles: dict[str, list[str]], tokens: int, runs: Path) -> dict[str, Config]:
    """Each toggle's resolved config at the token budget: same steps x batch x seq_len, one eval at the end,
    its own run dir under `runs`, the shared data dir. A toggle that breaks the config is refused up front."""
    per_step = base.train.batch_size * base.data.seq_len
    steps = tokens // per_step
    if steps < 1:
        raise ConfigError(f"--tokens {tokens} is less than one step of train.batch_size x data.seq_len = {per_step} "
                          f"tokens; raise --tokens")
    common = [f"train.steps={steps}", f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}",
              f"train.warmup_steps={min(base.train.warmup_steps, max(steps // 10, 1))}", "train.tracking=none",
              f"data.data_dir={base.data.data_dir or runs / 'data'}"]
    out = {}
    for name, overrides in toggles.items():
        try:
            out[name] = resolve(apply_overrides(base, [*common, f"train.run_dir={runs / name.replace('=', '-')}",
                                                      *overrides]))
        except ConfigError as e:
            raise ConfigError(f"toggle '{name}' ({' '.join(overrides)}): {e}") from None
    return out


def child(cfg_path: str, result_path: str) -> int:
    """One run in this process (`--child`): train, write {val_bpb, val_loss, tokens_per_s} as JSON."""
    from atlas_jax.train import train

    cfg = load_config(cfg_path)
    result = train(cfg, fresh=True, progress=False)
    Path(result_path).write_text(json.dumps({"val_bpb": result.val_bpb, "val_loss": result.val_loss,
                                             "tokens_per_s": result.tokens_per_s, "stopped": result.stopped}))
    return 0


def run_one(name: str, overrides: list[str], cfg: Config) -> Row:
    """Train `cfg` in a child process (its output in <run dir>.log); its numbers, and its peak RSS from os.wait4."""
    from atlas_jax.model import count_params_from_config

    run_dir = Path(cfg.train.run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = run_dir.parent / f"{run_dir.name}.yaml", run_dir.parent / f"{run_dir.name}.json"
    save_config(cfg, cfg_path)
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "atlas_jax.ablate", "--child", str(cfg_path), str(result_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    (run_dir.parent / f"{run_dir.name}.log").write_text(output, encoding="utf-8")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.is_file():
        last = [ln for ln in output.splitlines() if ln.strip()][-1:] or ["no output"]
        why = last[0].removeprefix("error: ")
        raise AtlasError(f"toggle '{name}': the run in {run_dir} failed (exit {proc.returncode}): {why}")
    res = json.loads(result_path.read_text())
    if res["stopped"] != "done" or res["val_bpb"] is None:
        raise AtlasError(f"toggle '{name}': the run in {run_dir} stopped ({res['stopped']}) without a final val bpb")
    n = count_params_from_config(cfg.model)
    return Row(name, overrides, res["val_bpb"], res["val_loss"], res["tokens_per_s"] or math.nan, n["total"],
               n["active"], usage.ru_maxrss / 1024, wall)


def ablate(base: Config, toggles: dict[str, list[str]], tokens: int, runs: Path, log=print) -> list[Row]:
    """Every toggle's run, one after another, with a progress line (and ETA) after each."""
    cfgs = plan(base, toggles, tokens, runs)
    rows: list[Row] = []
    t0 = time.perf_counter()
    for i, (name, cfg) in enumerate(cfgs.items()):
        row = run_one(name, toggles[name], cfg)
        rows.append(row)
        done = time.perf_counter() - t0
        eta = done / len(rows) * (len(cfgs) - len(rows))
        log(f"[{len(rows)}/{len(cfgs)}] {name}: val {row.val_bpb:.4f} bits/byte, {row.tokens_per_s:,.0f} tokens/s, "
            f"peak {row.peak_rss_mib:,.0f} MiB, {row.wall_s:.0f} s; ETA {eta / 60:.1f} min")
    return rows


COLUMNS = ("toggle", "overrides", "val bits/byte", "val loss (nats)", "tokens/s", "params", "active params",
           "peak RSS (MiB)", "wall (s)")


def table(rows: list[Row]) -> str:
    """The markdown table of `rows`, one line per toggle in COLUMNS order."""
    align = ["---", "---"] + ["---:"] * (len(COLUMNS) - 2)  # names left, numbers right
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [r.name, " ".join(f"`{o}`" for o in r.overrides) or "(the config)", f"{r.val_bpb:.4f}",
                 f"{r.val_loss:.4f}", f"{r.tokens_per_s:,.0f}", f"{r.params_total:,}", f"{r.params_active:,}",
                 f"{r.peak_rss_mib:,.0f}", f"{r.wall_s:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_png(rows: list[Row], path: Path, title: str) -> Path:
    """Bar charts: val bits per byte and tokens/s per toggle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, values, label in ((a, [r.val_bpb for r in rows], "val bits per byte (lower is better)"),
                              (b, [r.tokens_per_s for r in rows], "tokens/s")):
        bars = ax.bar(names, values, color=["#555555"] + ["#3b75af"] * (len(rows) - 1))
        ax.bar_label(bars, fmt="%.3f" if ax is a else "%.0f", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        if ax is a:
            lo, hi = min(values), max(values)
            ax.set_ylim(lo - (hi - lo + 1e-3) * 0.5, hi + (hi - lo + 1e-3) * 0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def report(rows: list[Row], command: str, tokens: int, base: Config, png: Path | None) -> str:
    steps = tokens // (base.train.batch_size * base.data.seq_len)
    budget = (f"{steps} steps x batch {base.train.batch_size} x seq_len {base.data.seq_len} = "
              f"{steps * base.train.batch_size * base.data.seq_len:,} tokens per run")
    parts = ["# Ablations", "", f"Command: `{command}`", "", f"Budget: {budget}; each run in its own process, "
             f"one after another; val bits per byte on the val split's first train.eval_batches batches.", "",
             table(rows), ""]
    if png is not None:
        parts += [f"![ablations]({png.name})", ""]
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_jax.ablate", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run, e.g. model.d_model=128")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"train tokens per run (default {DEFAULT_TOKENS:,})")
    p.add_argument("--set", default="default", help=f"the toggle set: {', '.join(SETS)}")
    p.add_argument("--toggles", help="comma-separated names from the set (default: all of it)")
    p.add_argument("--runs", type=Path, default=Path("runs/ablate"), help="where the runs and their data go")
    p.add_argument("--out", type=Path, default=Path("docs/ablations.md"), help="the markdown report")
    p.add_argument("--png", type=Path, help="the bar chart (default: --out with .png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(*argv[1:3])
    args = parse_args(argv)
    if args.set not in SETS:
        raise ConfigError(f"--set {args.set}: not one of {', '.join(SETS)}")
    base = load_config(args.config, args.overrides)
    toggles = SETS[args.set](base.model)
    if args.toggles:
        names = [n.strip() for n in args.toggles.split(",") if n.strip()]
        unknown = [n for n in names if n not in toggles]
        if unknown:
            raise ConfigError(f"--toggles {unknown[0]}: not in --set {args.set} ({', '.join(toggles)})")
        toggles = {n: toggles[n] for n in names}
    tokens = args.tokens
    png = args.png or args.out.with_suffix(".png")
    for path in (args.out, png):
        if path.exists() and path.is_dir():
            raise AtlasError(f"{path}: a directory; --out and --png name files")
    rows = ablate(base, toggles, tokens, args.runs)
    command = "python -m atlas_jax.ablate " + " ".join(argv)
    write_png(rows, png, f"{args.config or 'defaults'}: {len(rows)} runs at {tokens:,} tokens each")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(rows, command, tokens, base, png), encoding="utf-8")
    print(table(rows))
    print(f"wrote {args.out} and {png}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
