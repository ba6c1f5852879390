"""Export a trained Atlas checkpoint as a GGUF file for llama.cpp.

    python -m atlas_jax.export.to_gguf runs/shakespeare --out shakespeare.gguf [--type q8_0] [--name NAME]

(also `python scripts/to_gguf.py ...`). q4_0 is calibrated by default: GPTQ on the run's train split
(atlas_jax/export/quantize.py), the same Q4_0 blocks with less error; --no-calibrate rounds each
weight on its own (gguf.quants).

RUN_DIR_OR_CHECKPOINT is a run dir (its latest checkpoint) or one checkpoint's step dir.
Types: f32, f16, bf16, q8_0, q4_0 (written here), q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer,
needs llama-cpp-python). See atlas_jax/export/gguf.py for what each keeps at higher precision.
A file llama.cpp may not reproduce exactly (a unigram tokenizer) is still written, with one
`warning: ...` line on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

from atlas_jax.errors import run_cli
from atlas_jax.export.gguf import ALL_FTYPES, ExportWarning


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", choices=ALL_FTYPES, default="f32", dest="ftype")
    p.add_argument("--name", default=None, help="general.name (default: the run dir's name)")
    p.add_argument("--write-output-for-tied", action="store_true",
                   help="tied models: write output.weight too (default: llama.cpp reuses token_embd)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="q4_0: round each weight to its nearest code instead of GPTQ on the run's train split")
    p.add_argument("--calibration-windows", type=int, default=32, metavar="N",
                   help="q4_0: train windows of data.seq_len tokens GPTQ measures inputs on (default 32)")
    args = p.parse_args(argv)

    from atlas_jax.checkpoint import find_checkpoint, load_for_inference
    from atlas_jax.data.prepare import run_data_dir
    from atlas_jax.export.calibrate import run_calibration
    from atlas_jax.export.gguf import export_gguf

    start = time.perf_counter()
    params, cfg, tokenizer = load_for_inference(args.checkpoint)
    run_dir, step_dir = find_checkpoint(args.checkpoint)
    calibration, how = None, ""
    if args.ftype == "q4_0" and args.calibrate:
        calibration = run_calibration(params, cfg, run_data_dir(cfg.data, run_dir), args.calibration_windows)
        how = f", GPTQ on {args.calibration_windows} train windows"
    with _export_warnings_as_lines():
        out = export_gguf(params, cfg.model, tokenizer, args.out, args.ftype,
                          args.name or Path(run_dir).resolve().name, args.write_output_for_tied,
                          calibration=calibration)
    print(f"wrote {out} ({args.ftype}{how}, {out.stat().st_size / 2**20:.2f} MiB, {cfg.model.arch}, from {step_dir}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


@contextlib.contextmanager
def _export_warnings_as_lines():
    """Within: each ExportWarning is one `warning: ...` line on stderr (other warnings as usual)."""
    with warnings.catch_warnings():  # restores showwarning on the way out
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ExportWarning):
                print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
