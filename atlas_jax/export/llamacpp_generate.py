"""Generate text with llama.cpp (llama-cpp-python) from a GGUF file, streaming it to the terminal.

    python -m atlas_jax.export.llamacpp_generate runs/shakespeare/shakespeare-q8_0.gguf --prompt "ROMEO:"

(also `python scripts/llamacpp_generate.py ...`). The model loads with `use_extra_bufts` off (see
atlas_jax/export/llamacpp.py: llama.cpp 0.3.36's AMX path crashes on quantized tensors) and an f32
KV cache.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from atlas_jax.errors import AtlasError, run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.gguf.is_file():
        raise AtlasError(f"{args.gguf}: no such GGUF file; write one with scripts/to_gguf.py")
    if not args.prompt:
        raise AtlasError("--prompt is empty; give the text to continue")

    import gguf

    from atlas_jax.export.llamacpp import open_llama

    reader = gguf.GGUFReader(args.gguf)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_ctx = int(reader.fields[gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)].contents())
    llm = open_llama(str(args.gguf), n_ctx=n_ctx, logits_all=False, seed=args.seed)
    print(args.prompt, end="", flush=True)
    start, n = time.perf_counter(), 0
    for chunk in llm(args.prompt, max_tokens=min(args.max_tokens, n_ctx - len(llm.tokenize(args.prompt.encode(), add_bos=False))),
                     temperature=args.temperature, top_k=args.top_k, seed=args.seed, stream=True):
        print(chunk["choices"][0]["text"], end="", flush=True)
        n += 1
    print()
    print(f"[llama.cpp: {n} tokens in {time.perf_counter() - start:.2f}s, context {n_ctx}]", file=sys.stderr)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
