"""Generate text from a trained run: stream to the terminal, print JSON lines, or chat in a REPL.

    python -m atlas_jax.generate --checkpoint runs/shakespeare --prompt "ROMEO:" --max-new-tokens 100
    python -m atlas_jax.generate --checkpoint runs/shakespeare --prompts-file prompts.txt --jsonl
    echo "JULIET:" | python -m atlas_jax.generate --checkpoint runs/shakespeare/checkpoints/2000
    python -m atlas_jax.generate --checkpoint runs/shakespeare --interactive
    python -m atlas_jax.generate --checkpoint runs/shakespeare-sft --chat --prompt "Continue ROMEO's speech: But soft!"

Sampling defaults come from the checkpoint's config (sample.*); each flag overrides its namesake.
A prompt is its text's tokens, without BOS (training documents carry no BOS, only a trailing EOS);
a row stops at EOS or after --max-new-tokens. A --prompts-file holds one prompt per line; stdin
(when neither --prompt nor --prompts-file is given) is one prompt. Prompt i, sample j draws with
fold_in(fold_in(key(seed), i), j), so streaming and --jsonl print the same samples.
--chat: each prompt is a user message, rendered with the run's chat template (the one it was
fine-tuned with, <run>/chat_template.jinja, or --chat-template) with the assistant's turn opened,
and only the reply is printed; that rendered text is what llama.cpp's chat completion sees too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from atlas_jax import compile_cache
from atlas_jax.errors import AtlasError, run_cli
from atlas_jax.files import check_utf8, read_stdin_utf8

BOLD, RESET = "\x1b[1m", "\x1b[0m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its latest checkpoint) or a checkpoint step directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", type=Path, help="a UTF-8 file with one prompt per line")
    src.add_argument("--interactive", action="store_true", help="read prompts line by line until EOF (Ctrl-D)")
    p.add_argument("--max-new-tokens", type=int, help="sample.max_new_tokens")
    p.add_argument("--temperature", type=float, help="sample.temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, help="sample.top_k (0 disables)")
    p.add_argument("--top-p", type=float, help="sample.top_p (1 disables)")
    p.add_argument("--seed", type=int, help="sample.seed")
    p.add_argument("--window", type=int, help="sample.window: stream past max_seq_len with a KV cache of this many "
                                              "tokens (StreamingLLM; 0 = off)")
    p.add_argument("--n-sink", type=int, help="sample.n_sink: with --window, the first tokens the cache keeps")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--chat", action="store_true", help="prompts are user messages in the run's chat template")
    p.add_argument("--chat-template", help="with --chat: a built-in (chatml) or .jinja file instead of the run's")
    p.add_argument("--kernel-layout", choices=("auto", "in_out", "out_in"), default="auto",
                   help="how the weights are held for decoding: [in, out] as trained, or [out, in] (faster "
                        "matrix-vector products); auto: [out, in] on CPU when one row is decoded at a time")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (or ATLAS_COMPILE_CACHE=0)")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per sample: {prompt, completion, tokens, tokens_per_s}")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt texts of a non-interactive run; an empty one is an AtlasError."""
    if args.prompt is not None:
        prompts, where = [args.prompt], ["--prompt"]
    elif args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise AtlasError(f"{args.prompts_file}: cannot read the prompts file ({why})") from None
        lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []
        if not lines:
            raise AtlasError(f"{args.prompts_file}: no prompts in the file (one prompt per line)")
        prompts, where = lines, [f"{args.prompts_file}:{i + 1}" for i in range(len(lines))]
    elif sys.stdin.isatty():
        raise AtlasError("no prompt: give --prompt TEXT, --prompts-file FILE, pipe text on stdin, or --interactive")
    else:
        text = read_stdin_utf8()
        prompts, where = [text[:-1] if text.endswith("\n") else text], ["stdin"]
    for prompt, w in zip(prompts, where):
        if not prompt:
            raise AtlasError(f"{w}: the prompt is empty; give some text to continue")
        check_utf8(prompt, w)
    return prompts


class TextStream:
    """Token ids in, newly printable text out; holds back a UTF-8 character split across tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character (byte pieces): wait for the rest
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def flush(self) -> str:
        return self.tokenizer.decode(self.ids)[self.shown:]


class Session:
    """A loaded checkpoint and tokenizer, and the sampling settings of this command."""

    def __init__(self, args: argparse.Namespace):
        from atlas_jax.init_from import load_model
        from atlas_jax.config import validate_sample_window
        from atlas_jax.sample import check_sample_config, device_put_leafwise, preferred_kernel_layout
        from atlas_jax.tokenizer import Tokenizer

        # Streaming decodes one row at a time; --jsonl decodes the --num-samples rows of a prompt together.
        rows = args.num_samples if args.jsonl else 1
        self.kernel_layout = preferred_kernel_layout(rows) if args.kernel_layout == "auto" else args.kernel_layout
        params, cfg, tokenizer_path = load_model(args.checkpoint)  # LoRA runs: merged
        self.params = device_put_leafwise(params, self.kernel_layout)  # one copy of the weights at the peak, not two
        self.model_cfg = cfg.model
        self.tokenizer = Tokenizer.load(tokenizer_path)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:  # fewer: a padded embedding (rows never emitted)
            raise AtlasError(f"{tokenizer_path} has {self.tokenizer.vocab_size} pieces but the checkpoint's "
                             f"model.vocab_size={cfg.model.vocab_size}; put the run's own tokenizer file (tokenizer.model or tokenizer.json) beside it")
        flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                 "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                 "window": args.window, "n_sink": args.n_sink}
        self.sample_cfg = dataclasses.replace(cfg.sample, **{k: v for k, v in flags.items() if v is not None})
        check_sample_config(self.sample_cfg)
        validate_sample_window(self.sample_cfg, self.model_cfg)
        self.num_samples = args.num_samples
        self.template = None
        if args.chat or args.chat_template:
            from atlas_jax.checkpoint import find_checkpoint
            from atlas_jax.finetune.templates import load_template, run_template

            if args.chat_template:
                self.template = load_template(args.chat_template)
            else:
                self.template = run_template(find_checkpoint(args.checkpoint)[0])
                if self.template is None:
                    raise AtlasError(f"{args.checkpoint}: --chat, but the run has no chat template (it was not "
                                     f"fine-tuned with train.objective=sft/dpo); name one with --chat-template chatml")
        self.key = jax.random.key(self.sample_cfg.seed)
        self.tty = sys.stdout.isatty()

    def encode(self, prompt: str) -> list[int]:
        """The prompt's tokens: its text, or with --chat the rendered user turn + the opened assistant turn."""
        if self.template is None:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.template.render([{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True))

    def run(self, prompt: str, prompt_index: int, jsonl: bool) -> np.ndarray:
        """Print every sample of one prompt -> the speed totals of `run_stream` (zeros for --jsonl)."""
        if not jsonl:
            return self.run_stream(prompt, prompt_index)
        for record in self.run_jsonl(prompt, prompt_index):
            print(json.dumps(record, ensure_ascii=False), flush=True)
        return np.zeros(4)

    def run_jsonl(self, prompt: str, prompt_index: int) -> Iterator[dict]:
        """Every sample of one prompt in one batch (row j draws with fold_in(prompt key, j)) -> a dict each."""
        from atlas_jax.sample import generate

        ids = self.encode(prompt)
        start = time.perf_counter()
        tokens_BxN, lengths_B = generate(
            self.params, [ids] * self.num_samples, jax.random.fold_in(self.key, prompt_index), self.sample_cfg,
            self.model_cfg, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, kernel_layout=self.kernel_layout)
        tokens_BxN, lengths_B = jax.device_get((tokens_BxN, lengths_B))
        elapsed = time.perf_counter() - start
        for row, n in zip(tokens_BxN, lengths_B):
            new = [int(t) for t in row[:n]]
            yield {"prompt": prompt, "completion": self.tokenizer.decode(new), "tokens": new,
                   "tokens_per_s": round(int(n) / elapsed, 2)}

    def run_stream(self, prompt: str, prompt_index: int) -> np.ndarray:
        """Print each sample of one prompt as it is generated -> [tokens, seconds, decode tokens, decode seconds].

        The decode rate is timed from each sample's first token on: before it come the prefill and,
        the first time a shape is seen, the compiles.
        """
        from atlas_jax.sample import stream

        ids = self.encode(prompt)
        prompt_key = jax.random.fold_in(self.key, prompt_index)
        totals = np.zeros(4)
        for j in range(self.num_samples):
            if j:
                print(flush=True)
            start = first = time.perf_counter()
            key = jax.random.fold_in(prompt_key, j)[None]  # the key of row j in run_jsonl's batch
            steps = stream(self.params, [ids], key, self.sample_cfg, self.model_cfg,
                           eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                           kernel_layout=self.kernel_layout)  # checks before printing
            if self.template is None:  # a continuation follows its prompt; a chat reply stands alone
                sys.stdout.write(f"{BOLD}{prompt}{RESET}" if self.tty else prompt)
            sys.stdout.flush()
            text = TextStream(self.tokenizer)
            n = 0
            for tokens_B, _ in steps:
                n += 1
                if n == 1:
                    first = time.perf_counter()
                sys.stdout.write(text.push(int(tokens_B[0])))
                sys.stdout.flush()
            sys.stdout.write(text.flush() + "\n")
            sys.stdout.flush()
            end = time.perf_counter()
            totals += (n, end - start, n - 1, end - first)
        return totals


def report_speed(totals: np.ndarray) -> None:
    tokens, seconds, decode_tokens, decode_seconds = totals
    rate = f"{decode_tokens / decode_seconds:.1f}" if decode_seconds > 0 else "n/a"
    print(f"{int(tokens)} tokens in {seconds:.2f}s ({tokens / max(seconds, 1e-9):.1f} tokens/s with prefill and "
          f"compile; decode {rate} tokens/s; {compile_cache.describe()})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_samples < 1:
        raise AtlasError(f"--num-samples must be positive, got {args.num_samples}")
    prompts = None if args.interactive else read_prompts(args)
    compile_cache.setup(not args.no_compile_cache)
    session = Session(args)
    if args.interactive:
        return interactive(session, args.jsonl)
    totals = np.zeros(4)
    for i, prompt in enumerate(prompts):
        if i and not args.jsonl:
            print()
        totals += session.run(prompt, i, args.jsonl)
    if not args.jsonl:
        report_speed(totals)
    return 0


def interactive(session: Session, jsonl: bool) -> int:
    """A REPL: each line is a prompt; an empty line is ignored; EOF ends it; Ctrl-C stops one generation."""
    i = 0
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        try:
            check_utf8(line, "stdin")
            totals = session.run(line, i, jsonl)
            if not jsonl:
                report_speed(totals)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        except AtlasError as e:  # e.g. a prompt too long for the model: say so and keep going
            print(f"error: {e}", file=sys.stderr)
        i += 1


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
