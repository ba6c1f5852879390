"""Hugging Face model directories <-> Atlas runs.

    python -m atlas_jax.hf import SRC --out RUN_DIR [--force]
    python -m atlas_jax.hf export RUN_DIR --out HF_DIR [--dtype float32|bfloat16|float16] [--max-shard-size 5GB] [--force]
    python -m atlas_jax.hf export LORA_RUN --out ADAPTER_DIR --adapter [--dtype ...] [--force]

import: SRC is a local Hugging Face model directory (config.json, model.safetensors or a sharded
index, tokenizer files) or a hub id (downloaded with huggingface_hub into its cache). RUN_DIR gets
config.yaml, the tokenizer and a step-0 checkpoint (params only) that generate, to_gguf and
`train.init_from=run:RUN_DIR` take like any run.
export: RUN_DIR (its latest checkpoint) or one step dir -> a directory that
transformers.AutoModelForCausalLM / AutoTokenizer load with no custom code (a LoRA run: the merged
model). With --adapter, a LoRA run's adapters only, as a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) for its base exported the same way (atlas_jax/hf/adapter.py).
Both write into a temporary directory and rename it when complete; an existing --out is replaced
only with --force. Every refusal is one `error: ...` line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from atlas_jax.errors import AtlasError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + error lines -> one AtlasError line
        raise AtlasError(f"{message}; see --help")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m atlas_jax.hf", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    i = sub.add_parser("import", help="a Hugging Face model -> an Atlas run dir")
    i.add_argument("src", metavar="SRC", help="a Hugging Face model directory or hub id")
    i.add_argument("--out", required=True, type=Path, help="the run directory to create")
    i.add_argument("--force", action="store_true", help="replace --out when it exists")
    e = sub.add_parser("export", help="an Atlas run -> a Hugging Face model directory")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--out", required=True, type=Path, help="the directory to create")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (default 5GB)")
    e.add_argument("--force", action="store_true", help="replace --out when it exists")
    e.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write its adapters as a PEFT adapter directory instead of the merged model")
    args = p.parse_args(argv)

    from atlas_jax.hf.io import parse_size
    from atlas_jax.hf.run import export_run, import_model

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if args.cmd == "import":
        import_model(args.src, args.out, force=args.force, log=log)
    elif args.adapter:
        from atlas_jax.hf.adapter import export_adapter

        export_adapter(args.run, args.out, dtype=args.dtype, force=args.force, log=log)
    else:
        export_run(args.run, args.out, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
                   force=args.force, log=log)
    log(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
