"""Fine-tuning data that needs no download.

    python -m atlas_jax.finetune make-data --out data/finetune [--examples 2000] [--seed 0]

writes sft.jsonl (chat: continue a speech) and dpo.jsonl (the true continuation chosen, another
character's rejected) from tinyshakespeare; configs/sft.yaml and configs/dpo.yaml train on them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atlas_jax.errors import AtlasError, run_cli


def main(argv: list[str] | None = None) -> int:
    from atlas_jax.data.corpora import resolve_sources
    from atlas_jax.files import writable_dir
    from atlas_jax.finetune.shakespeare import make_rows, write_jsonl

    p = argparse.ArgumentParser(prog="python -m atlas_jax.finetune", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-data", help="sft.jsonl and dpo.jsonl from tinyshakespeare")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--corpus", default="tinyshakespeare", help="a corpus name or .txt file (default tinyshakespeare)")
    m.add_argument("--examples", type=int, default=2000)
    m.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.examples < 2:
        raise AtlasError(f"--examples {args.examples}: must be at least 2 (one is kept for validation)")
    out = writable_dir(args.out, "--out")
    path = resolve_sources([args.corpus], key="--corpus")[0]
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise AtlasError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AtlasError(f"{path}: not UTF-8 text (byte {e.start}); give a UTF-8 .txt corpus") from None
    sft, dpo = make_rows(text, args.examples, args.seed)
    for name, rows in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
        print(f"wrote {write_jsonl(rows, out / name)} ({len(rows)} rows)", file=sys.stderr)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
