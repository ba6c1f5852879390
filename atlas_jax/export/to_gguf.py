"""Export a trained Atlas checkpoint as a GGUF file for llama.cpp.

    python -m atlas_jax.export.to_gguf runs/shakespeare --out shakespeare.gguf [--type q8_0] [--name NAME]
    python -m atlas_jax.export.to_gguf runs/lora --out adapter.gguf --adapter [--type f16]

(also `python scripts/to_gguf.py ...`). q4_0 is calibrated by default: GPTQ on the run's train split
(atlas_jax/export/quantize.py), the same Q4_0 blocks with less error; --no-calibrate rounds each
weight on its own (gguf.quants).

RUN_DIR_OR_CHECKPOINT is a run dir (its latest checkpoint) or one checkpoint's step dir. A LoRA run
exports the merged model (its adapters folded into the base); with --adapter, only its adapters, as
a GGUF LoRA adapter llama.cpp applies to the base's GGUF at load time (`llama-cli -m base.gguf --lora
adapter.gguf`; atlas_jax/export/gguf_lora.py), f32 or f16, after checking that the base the run
names is still the one it was trained on (lora_base.json).
Types: f32, f16, bf16, q8_0, q4_0 (written here), q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer,
needs llama-cpp-python). See atlas_jax/export/gguf.py for what each keeps at higher precision.
A file llama.cpp may not reproduce exactly (a unigram tokenizer) is still written, with one
`warning: ...` line on stderr.

--out is checked before anything is loaded: its directory must exist and take a new file (one is
created there and removed), an existing file is replaced only with --force, and the run's own files
are never replaced, --force or not: inside the run dir (or its data dir) --out must be a .gguf name
outside checkpoints/ that is new or already a GGUF file, and never the run's tokenizer. The file is
written under a temporary name beside --out and renamed when complete, so a failed export leaves
whatever was there. Every refusal is one `error: ...` line and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from atlas_jax.errors import AtlasError, run_cli
from atlas_jax.export.gguf import ALL_FTYPES, ExportError, ExportWarning

GGUF_MAGIC = b"GGUF"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + error lines -> one AtlasError line
        raise AtlasError(f"{message}; see --help")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="to_gguf.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace --out when it exists (never a file of the run)")
    p.add_argument("--type", choices=ALL_FTYPES, default="f32", dest="ftype")
    p.add_argument("--name", default=None, help="general.name (default: the run dir's name)")
    p.add_argument("--write-output-for-tied", action="store_true",
                   help="tied models: write output.weight too (default: llama.cpp reuses token_embd)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="q4_0: round each weight to its nearest code instead of GPTQ on the run's train split")
    p.add_argument("--calibration-windows", type=int, default=32, metavar="N",
                   help="q4_0: train windows of data.seq_len tokens GPTQ measures inputs on (default 32)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write its adapters as a GGUF LoRA adapter for the base's GGUF (f32 or f16)")
    args = p.parse_args(argv)
    if args.calibration_windows < 1:
        raise ExportError(f"--calibration-windows {args.calibration_windows}: must be at least 1 "
                          f"(the train windows GPTQ measures q4_0 inputs on; --no-calibrate skips it)")

    start = time.perf_counter()
    # --out first, before JAX is imported: the run dir is the argument, or two up from checkpoints/<step>
    check_out_dir(args.out)
    given = Path(args.checkpoint)
    for root in dict.fromkeys([given, *([given.parent.parent] if given.parent.name == "checkpoints" else [])]):
        refuse_run_files(args.out, root)
    if args.out.exists() and not args.force:
        raise ExportError(f"--out {args.out}: the file exists; pass --force to replace it or choose another --out")
    check_writable(args.out)

    from atlas_jax.checkpoint import find_checkpoint
    from atlas_jax.data.prepare import run_data_dir
    from atlas_jax.export.calibrate import run_calibration
    from atlas_jax.export.gguf import export_gguf

    run_dir, step_dir = find_checkpoint(args.checkpoint)
    refuse_run_files(args.out, run_dir)
    if args.adapter:
        return _export_adapter(args, run_dir, step_dir, start)
    from atlas_jax.init_from import load_model

    params, cfg, tokenizer = load_model(args.checkpoint)  # a LoRA run: merged into its base
    # the run's data dir and tokenizer may lie outside the run dir
    refuse_run_files(args.out, run_data_dir(cfg.data, run_dir), tokenizer, *filter(None, [cfg.data.tokenizer]),
                     where="the run's data dir")
    calibration, how = None, ""
    if args.ftype == "q4_0" and args.calibrate:
        calibration = run_calibration(params, cfg, run_data_dir(cfg.data, run_dir), args.calibration_windows)
        how = f", GPTQ on {args.calibration_windows} train windows"
    try:
        with _export_warnings_as_lines():
            from atlas_jax.finetune.templates import run_template
            template = run_template(run_dir)  # a fine-tuned run's chat template travels with the file
            out = export_gguf(params, cfg.model, tokenizer, args.out, args.ftype,
                              args.name or Path(run_dir).resolve().name, args.write_output_for_tied,
                              calibration=calibration, chat_template=template.source if template else None)
    except OSError as e:  # disk full, the directory went away: the temporary is gone, --out untouched
        raise ExportError(f"--out {args.out}: writing the GGUF file failed ({e.strerror or e}); "
                          f"nothing was replaced, free space or choose another --out") from None
    print(f"wrote {out} ({args.ftype}{how}, {out.stat().st_size / 2**20:.2f} MiB, {cfg.model.arch}, from {step_dir}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def _export_adapter(args, run_dir: Path, step_dir: Path, start: float) -> int:
    from atlas_jax.checkpoint import checkpoint_config, load_adapters
    from atlas_jax.data.prepare import run_data_dir
    from atlas_jax.export.gguf_lora import ADAPTER_FTYPES, export_lora_gguf
    from atlas_jax.init_from import base_params

    if checkpoint_config(step_dir).lora.rank == 0:
        raise ExportError(f"{args.checkpoint}: --adapter exports a LoRA run's adapters, but this run has none "
                          f"(lora.rank is 0); drop --adapter to export its model")
    if args.ftype not in ADAPTER_FTYPES:
        raise ExportError(f"--type {args.ftype} with --adapter: adapter tensors are written as "
                          f"{' or '.join(ADAPTER_FTYPES)}; pass --type f32 or --type f16")
    adapters, cfg, _ = load_adapters(step_dir)
    refuse_run_files(args.out, run_data_dir(cfg.data, run_dir), where="the run's data dir")
    base = base_params(cfg, run_dir)  # the base still the one the adapters were trained on (lora_base.json)
    try:
        out = export_lora_gguf(adapters, base, cfg.model, cfg.lora, args.out, args.ftype,
                               args.name or Path(run_dir).resolve().name)
    except OSError as e:
        raise ExportError(f"--out {args.out}: writing the GGUF file failed ({e.strerror or e}); "
                          f"nothing was replaced, free space or choose another --out") from None
    print(f"wrote {out} (LoRA adapter, {args.ftype}, rank {cfg.lora.rank}, {out.stat().st_size / 2**20:.2f} MiB, "
          f"{cfg.model.arch}, for the GGUF of {cfg.train.init_from}, from {step_dir}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def check_out_dir(out: Path) -> None:
    """--out names a file (not a directory) in a directory that exists."""
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; give a file name, e.g. --out {out / 'model.gguf'}")
    parent = out.parent
    if not parent.exists():
        raise ExportError(f"--out {out}: the directory {parent} does not exist; create it or choose another --out")
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is not a directory; choose another --out")


def refuse_run_files(out: Path, root: Path, *files: Path, where: str = "the run") -> None:
    """--out may not replace a file of the run, --force or not: inside `root` (the run dir or its data
    dir) only a .gguf name outside checkpoints/ that is new or already a GGUF file, and never one of
    `files`. Both the name and what it links to are checked."""
    named = out.parent.resolve() / out.name
    root = root.resolve()
    for place in dict.fromkeys([named, out.resolve()]):  # the name, then what it links to
        what = "" if place == named else f"links to {place}, which "
        never = "it is never replaced (not even with --force)"
        if any(place == Path(f).resolve() for f in files):
            raise ExportError(f"--out {out}: {what}is the run's tokenizer; {never}, choose another --out")
        if place != root and root not in place.parents:
            continue
        why = None
        if place == root or (root / "checkpoints") == place or (root / "checkpoints") in place.parents:
            why = "is the run's own checkpoint data"
        elif place.suffix != ".gguf":
            why = f"is inside {where} {root} and not a .gguf name, so it may be one of the run's files"
        elif place.exists() and not _is_gguf(place):
            why = f"is a file in {where} {root} that is not a GGUF file"
        if why:
            raise ExportError(f"--out {out}: {what}{why}; {never}, choose another --out, e.g. {root / 'model.gguf'}")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def check_writable(out: Path) -> None:
    """A new file can be created beside --out (where the export writes its temporary), removed at once."""
    try:
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}); "
                          f"choose a writable directory") from None
    os.close(fd)
    os.unlink(probe)


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
