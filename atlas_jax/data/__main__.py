"""python -m atlas_jax.data prepare --input SRC... --out DIR [--tokenizer PATH | --vocab-size N] ...
python -m atlas_jax.data seed tinyshakespeare PATH   (put a local copy of a known corpus in the cache)"""
from __future__ import annotations

import argparse
import codecs

from atlas_jax.config import TOKENIZER_TYPES, DataConfig
from atlas_jax.data.prepare import prepare
from atlas_jax.errors import ConfigError, run_cli


def _unescape(text: str) -> str:
    """'\\n\\n' as typed on a command line -> two newlines (also \\t, \\xNN); other characters kept."""
    return codecs.escape_decode(text.encode("utf-8"))[0].decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="python -m atlas_jax.data")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("prepare", help="tokenize sources into train/val shards")
    s.add_argument("--input", nargs="+", required=True,
                   help="corpus names (tinyshakespeare), .txt/.jsonl files, directories or globs")
    s.add_argument("--out", required=True, help="data directory (data.data_dir)")
    s.add_argument("--tokenizer", help="a sentencepiece .model; omitted or 'none': train one into OUT")
    s.add_argument("--vocab-size", type=int, help="the tokenizer's vocab size (needed to train one)")
    s.add_argument("--type", choices=TOKENIZER_TYPES, default=defaults.tokenizer_type)
    s.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    s.add_argument("--split-seed", type=int, default=defaults.split_seed)
    s.add_argument("--doc-separator", help=r".txt: the string between documents, e.g. '\n\n' (default: one per file)")
    s.add_argument("--text-field", default=defaults.text_field, help=".jsonl: the field holding the text")
    s.add_argument("--workers", type=int, default=defaults.num_workers)
    s.add_argument("--force", action="store_true", help="tokenize again even when the shards are up to date")
    seed = sub.add_parser("seed", help="copy a local file of a known corpus into the cache (checksum checked)")
    seed.add_argument("name", help="a known corpus, e.g. tinyshakespeare")
    seed.add_argument("path", help="the local copy")
    args = p.parse_args(argv)

    if args.command == "seed":
        from atlas_jax.data.corpora import seed_cache

        print(f"seeded {seed_cache(args.name, args.path)}")
        return 0

    if not 0.0 < args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be positive, got {args.workers}")
    if args.split_seed < 0:  # numpy's generators take no negative seed
        raise ConfigError(f"--split-seed must be 0 or more, got {args.split_seed}")
    from atlas_jax.data.corpora import resolve_sources

    resolve_sources(args.input, "--input")  # named by its flag here; prepare() names data.sources
    tokenizer = None if args.tokenizer in (None, "none", "null") else args.tokenizer
    cfg = DataConfig(
        sources=args.input, tokenizer=tokenizer, tokenizer_type=args.type, data_dir=args.out,
        val_fraction=args.val_fraction, split_seed=args.split_seed, text_field=args.text_field,
        doc_separator=None if args.doc_separator is None else _unescape(args.doc_separator),
        num_workers=args.workers)
    prepare(cfg, args.out, args.vocab_size, force=args.force, what="--out")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
