"""Generate text with llama.cpp (llama-cpp-python) from a GGUF file, streaming it to the terminal.

    python -m atlas_jax.export.llamacpp_generate runs/shakespeare/shakespeare-q8_0.gguf --prompt "ROMEO:"
    echo "JULIET:" | python -m atlas_jax.export.llamacpp_generate shakespeare-q8_0.gguf --max-tokens 40

(also `python scripts/llamacpp_generate.py ...`). Without --prompt, stdin (UTF-8) is the prompt.
llama.cpp runs in a child process (atlas_jax/export/llamacpp.py: `llamacpp_stream`, `use_extra_bufts`
off because llama.cpp 0.3.36's AMX path crashes on quantized tensors, an f32 KV cache), opened with
n_ctx = the file's context_length; its log (the "n_ctx_seq (256) > n_ctx_train" line of a short
context included: llama.cpp rounds contexts up to 256) stays off the terminal unless it fails, and
its reason ends the error line then. The prompt and --max-tokens must fit the file's context
together (without --max-tokens: up to 120 tokens, as many as fit). Sampling is llama.cpp's:
--temperature (0 = greedy), --top-k (0 disables), --top-p (1 disables), --seed.

Every bad input (a file that is not GGUF, a cut one, a prompt too long, a flag out of range) is one
`error: ...` line naming the file or flag, exit 2, before anything is generated.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from atlas_jax.errors import AtlasError, run_cli
from atlas_jax.files import check_utf8, read_stdin_utf8

GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata count (u64)
MAX_SEED = 2**32 - 2  # llama.cpp's seed is a uint32; 2**32 - 1 (LLAMA_DEFAULT_SEED) means "random"
DEFAULT_MAX_TOKENS = 120  # without --max-tokens, and fewer when the context has less room


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + error lines -> one AtlasError line
        raise AtlasError(f"{message}; see --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="llamacpp_generate.py", description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--prompt", help="the text to continue (default: stdin)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate at most (default: {DEFAULT_MAX_TOKENS}, or as many as fit the context)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="0 disables (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1]; 1 disables (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise AtlasError(f"--max-tokens {args.max_tokens}: must be at least 1 (the tokens to generate)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise AtlasError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise AtlasError(f"--top-k {args.top_k}: must be >= 0 (0 disables it)")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise AtlasError(f"--top-p {args.top_p}: must be in (0, 1] (1 disables it)")
    if not 0 <= args.seed <= MAX_SEED:
        raise AtlasError(f"--seed {args.seed}: must be an integer in [0, {MAX_SEED}]")
    return args


def read_prompt(prompt: str | None) -> tuple[str, str]:
    """(the prompt text, where it came from); not UTF-8 or empty is an AtlasError."""
    if prompt is not None:
        check_utf8(prompt, "--prompt")
        text, where = prompt, "--prompt"
    elif sys.stdin is None or sys.stdin.isatty():
        raise AtlasError("no prompt: give --prompt TEXT or pipe the text on stdin")
    else:
        text = read_stdin_utf8()
        text, where = text.removesuffix("\n"), "stdin"
    if not text:
        raise AtlasError(f"{where}: the prompt is empty; give the text to continue")
    return text, where


def gguf_context_length(path: Path) -> int:
    """The file's {arch}.context_length, after checking that it is a whole GGUF file: the magic, a
    header gguf-py reads, and every tensor's data inside the file (a one-line AtlasError otherwise)."""
    fix = "write it again with scripts/to_gguf.py"
    if not path.exists():
        raise AtlasError(f"{path}: no such GGUF file; write one with scripts/to_gguf.py")
    if not path.is_file():
        raise AtlasError(f"{path}: is a directory, not a GGUF file; give the .gguf file's path")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(GGUF_HEADER_BYTES)
    except OSError as e:
        raise AtlasError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from None
    if size == 0:
        raise AtlasError(f"{path}: the file is empty (0 bytes), not a GGUF file; {fix}")
    if not head.startswith(GGUF_MAGIC):
        raise AtlasError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r}); "
                         f"give a .gguf file written by scripts/to_gguf.py")
    if size < GGUF_HEADER_BYTES:
        raise AtlasError(f"{path}: truncated GGUF file ({size} bytes, shorter than its header); {fix}")

    import gguf

    try:
        reader = gguf.GGUFReader(path)  # read-only memmap
    except Exception as e:  # gguf-py raises assorted types (ValueError, IndexError, ...) on bad bytes
        raise AtlasError(f"{path}: truncated or corrupt GGUF file, gguf-py cannot read it; {fix} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise AtlasError(f"{path}: truncated GGUF file: its tensors end at byte {end} but the file has {size}; {fix}")
    arch_key = gguf.Keys.General.ARCHITECTURE
    if arch_key not in reader.fields:
        raise AtlasError(f"{path}: GGUF metadata lacks '{arch_key}'; {fix}")
    arch = str(reader.fields[arch_key].contents())
    ctx_key = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)
    if ctx_key not in reader.fields:
        raise AtlasError(f"{path}: GGUF metadata lacks '{ctx_key}'; {fix}")
    n_ctx = int(reader.fields[ctx_key].contents())
    if n_ctx < 2:
        raise AtlasError(f"{path}: GGUF metadata '{ctx_key}' is {n_ctx}, too small to generate anything; {fix}")
    return n_ctx


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_ctx = gguf_context_length(args.gguf)
    if args.max_tokens is not None and args.max_tokens >= n_ctx:
        raise AtlasError(f"--max-tokens {args.max_tokens}: the prompt and --max-tokens must fit {args.gguf}'s "
                         f"context of {n_ctx} tokens together; give --max-tokens at most {n_ctx - 1}")
    prompt, where = read_prompt(args.prompt)

    from atlas_jax.export.llamacpp import LlamaCppError, llamacpp_stream

    explicit = args.max_tokens is not None
    stream = llamacpp_stream(args.gguf, prompt, args.max_tokens if explicit else DEFAULT_MAX_TOKENS, n_ctx,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             shrink_to_fit=not explicit)
    try:
        _, n_prompt = next(stream)  # llama.cpp has loaded the file and tokenized the prompt
        if explicit and n_prompt + args.max_tokens > n_ctx:
            raise AtlasError(f"{where}: the prompt is {n_prompt} tokens; with --max-tokens {args.max_tokens} it must "
                             f"fit {args.gguf}'s context of {n_ctx} tokens (prompt + --max-tokens <= {n_ctx}); "
                             f"shorten the prompt to at most {n_ctx - args.max_tokens} tokens or lower --max-tokens")
        if n_prompt >= n_ctx:
            raise AtlasError(f"{where}: the prompt is {n_prompt} tokens, which leaves no room to generate in "
                             f"{args.gguf}'s context of {n_ctx} tokens (prompt + --max-tokens <= {n_ctx}); "
                             f"shorten the prompt to at most {n_ctx - 1} tokens")
        print(prompt, end="", flush=True)
        start, n = time.perf_counter(), 0  # the model is loaded and the prompt tokenized by now
        for kind, value in stream:
            if kind == "text":
                print(value, end="", flush=True)
            else:
                n = value
    except LlamaCppError as e:  # llama.cpp refused the file (or crashed on it): its reason, in one line
        raise LlamaCppError(f"{e}; check the file, or write it again with scripts/to_gguf.py") from None
    finally:
        stream.close()  # an early exit kills the child
    print(flush=True)
    print(f"[llama.cpp: {n} tokens in {time.perf_counter() - start:.2f}s, prompt {n_prompt} tokens, "
          f"context {n_ctx}]", file=sys.stderr)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
