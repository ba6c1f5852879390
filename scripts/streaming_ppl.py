"""Perplexity against position, far past the training context, for each KV-cache policy (docs/streaming.md).

    python scripts/streaming_ppl.py --checkpoint runs/a [--checkpoint runs/b] --length 1024 --rows 8 \\
        --sinks 0,1,4 --out streaming.json --markdown streaming.md --plot streaming.png

Per checkpoint: a window recomputed from scratch (unless --no-recompute), with --dense a cache that
keeps every token, and a streaming cache of
--window tokens (default the model's max_seq_len) with each --sinks count (0 = a plain rolling
window), over --rows slices of --length tokens of the run's val split (atlas_jax/eval/streaming.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atlas_jax.errors import AtlasError, run_cli


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True, help="a run or step dir (repeat for more)")
    p.add_argument("--length", type=int, default=1024, help="tokens scored per row")
    p.add_argument("--rows", type=int, default=8, help="val slices scored in parallel")
    p.add_argument("--window", type=int, help="cache size in tokens (default: model.max_seq_len)")
    p.add_argument("--sinks", default="0,1,4", help="comma-separated n_sink values for the streaming cache")
    p.add_argument("--no-recompute", action="store_true", help="skip the window recomputed from scratch")
    p.add_argument("--dense", action="store_true", help="also a cache that keeps every token (positions past "
                                                        "max_seq_len: the failure streaming avoids)")
    p.add_argument("--out", type=Path, help="results as JSON")
    p.add_argument("--markdown", type=Path, help="the table as markdown")
    p.add_argument("--plot", type=Path, help="perplexity against position as PNG")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from atlas_jax.eval import streaming as S
    from atlas_jax.eval.report import write_json
    from atlas_jax.init_from import load_model

    try:
        sinks = [int(s) for s in args.sinks.split(",") if s.strip()]
    except ValueError:
        raise AtlasError(f"--sinks {args.sinks!r}: expected comma-separated integers, e.g. 0,1,4") from None
    results = []
    for run in args.checkpoint:
        params, cfg, _ = load_model(run)
        m = cfg.model
        window = args.window or m.max_seq_len
        rows, bytes_BxN = S.val_rows(run, args.rows, args.length)
        edges = S.position_edges(window, args.length)
        name = Path(run).name + (f" [sink_tokens={m.sink_tokens}]" if m.sink_tokens else "")
        policies = ([] if args.no_recompute else [("recompute", "recompute")]) + ([("dense", None)] if args.dense else [])
        for label, k in policies + [(f"sinks={k}", k) for k in sinks]:
            nll = S.recompute_nll(params, m, rows, window) if k == "recompute" else S.stream_nll(params, m, rows, window, k)
            results.append({"label": f"{name} {label}", "checkpoint": str(run), "policy": label, "window": window,
                            "max_seq_len": m.max_seq_len, "buckets": S.by_position(nll, bytes_BxN, edges)})
            print(f"{results[-1]['label']}: " + ", ".join(
                f"{b['from']}-{b['to']} {b['perplexity']:.2f}" for b in results[-1]["buckets"]), file=sys.stderr)
    table = S.markdown(results)
    print(table)
    if args.out:
        write_json(args.out, {"length": args.length, "rows": args.rows, "results": results})
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if args.plot:
        S.plot(args.plot, results, f"val perplexity by position, {args.rows} x {args.length} tokens, "
                                   f"cache {results[0]['window']}")


if __name__ == "__main__":
    run_cli(main)
