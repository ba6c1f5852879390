"""`python -m atlas_jax.tokenizer train --input CORPUS --vocab-size N --out DIR [--kind bpe|unigram|bytelevel]`.

bpe and unigram are sentencepiece (DIR/tokenizer.model and .vocab); bytelevel is a GPT-2-style
byte-level BPE (DIR/tokenizer.json, Hugging Face tokenizers). `--type` is the same option's old name.

The entry point reads files the way data preparation does (corpus names, globs, .jsonl, UTF-8
checks), so it sits above both the tokenizer and the data floor.
"""
from __future__ import annotations

import argparse
import itertools
import time

from atlas_jax.config import DataConfig
from atlas_jax.data.corpora import resolve_sources
from atlas_jax.data.prepare import iter_texts
from atlas_jax.errors import ConfigError, DataError, run_cli
from atlas_jax.files import writable_dir
from atlas_jax.tokenizer import MODEL_TYPES, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlas_jax.tokenizer", description="Train a tokenizer.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a sentencepiece or byte-level BPE tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True,
                   help="corpus names (tinyshakespeare), .txt/.jsonl files, directories or globs")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="directory for tokenizer.model and .vocab, or tokenizer.json")
    t.add_argument("--kind", "--type", dest="kind", choices=MODEL_TYPES, default="bpe",
                   help="bpe, unigram (sentencepiece) or bytelevel (byte-level BPE, tokenizer.json)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--text-field", default="text", help=".jsonl: the field holding the text")
    args = p.parse_args(argv)

    if args.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be positive, got {args.vocab_size} (e.g. 2048; at least the "
                          f"256 byte pieces plus the corpus's characters)")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), got {args.seed}")
    start = time.perf_counter()
    paths = resolve_sources(args.input, "--input")
    texts = iter_texts(paths, DataConfig(text_field=args.text_field))
    first = next((t for t in texts if t.strip()), None)  # read (and check) the input before --out exists
    if first is None:
        raise DataError(f"--input {' '.join(args.input)}: no text in {', '.join(map(str, paths))} (empty or only "
                        f"whitespace); give a corpus with text to learn from")
    writable_dir(args.out, "--out")
    tok = train_tokenizer(itertools.chain([first], texts), args.out, args.vocab_size, args.kind, args.seed)
    print(f"wrote {tok.path} ({args.kind}, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
