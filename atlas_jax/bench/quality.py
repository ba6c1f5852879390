"""`bench quality`: every GGUF type of a trained run in llama.cpp against atlas_jax's float32
logits (export.quality.compare_run_with_llamacpp): size, max |dlogit|, top-1, perplexity, greedy."""
from __future__ import annotations

import tempfile

from atlas_jax.bench.common import BenchError, load_avg, log


def cmd_quality(args) -> dict:
    """Every GGUF type of a trained run against atlas_jax in llama.cpp: size, logits, perplexity."""
    from atlas_jax.export.quality import compare_run_with_llamacpp

    if not args.checkpoint:  # the CLI checks this first (cli.check_inputs); callers in a process may not
        raise BenchError("quality: pass --checkpoint RUN_DIR (a trained run: quality of random weights means little)")
    ftypes = list(args.ftypes)  # checked by the parser (common.names_from)
    section = {"checkpoint": args.checkpoint, "n_windows": args.windows, "load_avg_start": load_avg()}
    log(f"quality: {args.checkpoint}, {', '.join(ftypes)} on {args.windows} validation windows")
    with tempfile.TemporaryDirectory(prefix="atlas-quality-") as tmp:
        section["types"] = compare_run_with_llamacpp(args.checkpoint, tmp, ftypes, n_windows=args.windows)
    section["load_avg_end"] = load_avg()
    return section
