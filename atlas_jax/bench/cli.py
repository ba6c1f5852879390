"""Benchmarks: figures, never pass/fail. Each measurement runs in its own child process.

    python scripts/bench.py train   [--config configs/shakespeare.yaml] [section.key=value ...]
    python scripts/bench.py decode  [--checkpoint RUN_DIR]
    python scripts/bench.py scaling
    python scripts/bench.py longctx [--attention einsum,blocked] [--seq-lens 256,512,1024,2048,4096]
    python scripts/bench.py quality --checkpoint RUN_DIR
    python scripts/bench.py moe     [section.key=value ...]
    ... --quick        tiny sizes and few steps: a smoke test, each subcommand under a minute on a
                       quiet 2-core machine (the first torch.compile on a machine adds ~1 minute)

- train: the same model, batch and sequence length through atlas_jax's jitted `train_step`
  (make_mesh + create_sharded_state) and atlas_torch_ref: eager, model.loss under torch.compile,
  and torch at its best (torch_best: sdpa attention, the whole step under torch.compile; and
  torch_best_bf16, the same under bf16 autocast), from the same initial params, AdamW with the same
  settings on both sides. Median
  step time after warm-up (pooled over --rounds interleaved rounds), tokens/s, MFU, peak memory,
  atlas_jax's speed-up over each.
- decode: greedy prefill and decode tokens/s at batch 1 and 32, atlas_jax (`sample.generate`)
  against llama.cpp on GGUF files exported from the same params (f32 and q8_0): driven from Python
  (llama-cpp-python's batch API) and by llama.cpp's own llama-bench and llama-batched-bench on the
  same files and threads (built once: python scripts/build_llamacpp_tools.py; --llamacpp-tools DIR).
- scaling: atlas_jax (and torch eager) tokens/s as the sequence grows and as the model grows.
- longctx: training tokens/s, peak RSS and the attention's compiled temporaries per sequence length
  (256..4096 at the shakespeare width, a fixed number of tokens per step), one column per
  model.attention (default einsum against blocked, the FlashAttention-2 style kernel).
- quality: every GGUF type of a trained run in llama.cpp against atlas_jax: file size, max
  |dlogit|, top-1 agreement, validation perplexity, greedy continuation.
- hf: `python -m atlas_jax.hf` import and export of a 124M GPT-2 written by transformers, time and
  peak RSS, beside transformers' own from_pretrained + save_pretrained.
- finetune: full fine-tuning vs LoRA r=8 vs an nf4 base with LoRA r=8 on a 124M llama: trainable
  params, optimizer-state and base bytes, step time, peak RSS.
- moe: a MoE llama (8 experts, 2 per token) at the config's width against the dense llama with the
  same active params, and model.moe_impl grouped vs ragged vs dense dispatch: ms/step, tokens/s,
  peak RSS, total and active params.

Results merge into --out (JSON, default docs/benchmarks.json, one section per subcommand) and are
rendered as tables into --md (default: --out with .md) between the `bench:begin/end` markers,
with the machine, the library versions and the exact command of each section.

Every flag, the config(s), --checkpoint, --corpus and the output files are checked before the first
measurement; a mistake is one `error: ...` line and exit 2 (atlas_jax.errors.run_cli). --out must
be a .json file that is new or already holds bench results (it is merged, never replaced by
another kind of file), --md a .md file (only the block between the markers is replaced), and
--png a .png; each in an existing directory that takes new files. They are written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from atlas_jax.bench.common import (CORPUS, ENV_PREFIXES, REPO, BenchError, bench_config, cores, log, names_from,
                                    positive_int, positive_ints)
from atlas_jax.bench.decode import cmd_decode
from atlas_jax.bench.finetune import cmd_finetune
from atlas_jax.bench.hf import cmd_hf
from atlas_jax.bench.longctx import LONGCTX_ATTENTIONS, cmd_longctx
from atlas_jax.bench.moe import cmd_moe
from atlas_jax.bench.quality import cmd_quality
from atlas_jax.bench.report import check_outputs, check_png, render_markdown, write_outputs
from atlas_jax.bench.scaling import SIZES, cmd_scaling, scaling_configs
from atlas_jax.bench.train import FRAMEWORKS, cmd_train
from atlas_jax.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    from atlas_jax.export.gguf import ALL_FTYPES

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: configs/shakespeare.yaml; --quick: configs/tiny.yaml)")
    common.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.d_model=256 data.seq_len=256")
    common.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    common.add_argument("--steps", type=positive_int, help="timed steps (default 10; scaling 5; --quick 3/2)")
    common.add_argument("--warmup", type=positive_int,
                        help="untimed steps first, compile included (default 2; --quick 1)")
    common.add_argument("--out", default=str(REPO / "docs" / "benchmarks.json"), help="JSON results (merged)")
    common.add_argument("--md", help="markdown tables (default: --out with .md)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="atlas_jax vs torch eager, torch.compile and torch at its best, one train step")
    t.add_argument("--rounds", type=positive_int,
                   help="times each framework is run, interleaved (default 3; --quick 1)")
    t.add_argument("--frameworks", type=names_from(FRAMEWORKS), default=",".join(FRAMEWORKS),
                   help=f"comma list of {', '.join(FRAMEWORKS)}")
    d = sub.add_parser("decode", parents=[common], help="atlas_jax vs llama.cpp greedy decoding")
    d.add_argument("--checkpoint", help="a trained run dir (its params, config and tokenizer)")
    d.add_argument("--corpus", default=str(CORPUS), help="text for the tokenizer and the prompts")
    d.add_argument("--prompt-len", type=positive_int, help="prompt tokens per sequence (default 128; --quick 16)")
    d.add_argument("--new-tokens", type=positive_int, help="generated tokens per sequence (default 128; --quick 16)")
    d.add_argument("--batches", type=positive_ints, default="1,32", help="batch sizes (sequences decoded together)")
    d.add_argument("--ftypes", type=names_from(ALL_FTYPES), default="f32,q8_0", help="GGUF types for llama.cpp")
    d.add_argument("--threads", type=positive_int, help=f"llama.cpp threads (default: the {cores()} cores here)")
    d.add_argument("--reps", type=positive_int, help="timed repetitions (default 3; --quick 1)")
    d.add_argument("--kernel-layout", choices=("auto", "in_out", "out_in"), default="auto",
                   help="how atlas_jax holds its Dense kernels for decoding (auto: sample.preferred_kernel_layout "
                        "per batch size, [out, in] at batch 1 on CPU)")
    d.add_argument("--llamacpp-tools", metavar="DIR",
                   help="llama-bench and llama-batched-bench are here (default: $ATLAS_CACHE/llamacpp-tools/"
                        "<llama-cpp-python version>, built by python scripts/build_llamacpp_tools.py)")
    s = sub.add_parser("scaling", parents=[common], help="tokens/s against sequence length and model size")
    s.add_argument("--seq-lens", type=positive_ints, help="default 256,512,1024,2048 (--quick 32,64)")
    s.add_argument("--tokens-per-step", type=positive_int,
                   help="batch x seq at every point (default 8192; --quick 256)")
    s.add_argument("--sizes", help=f"configs by name ({', '.join(SIZES)}) or YAML path (default: all three)")
    s.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="torch eager beside atlas_jax (default: yes, except with --quick)")
    s.add_argument("--png", help="the plot (default: scaling.png beside --out)")
    lc = sub.add_parser("longctx", parents=[common], help="tokens/s and memory against sequence length per "
                        "model.attention (einsum vs blocked)")
    lc.add_argument("--seq-lens", type=positive_ints, help="default 256,512,1024,2048,4096 (--quick 32,64)")
    lc.add_argument("--tokens-per-step", type=positive_int,
                    help="batch x seq at every point (default 8192; --quick 128)")
    lc.add_argument("--attention", type=names_from(LONGCTX_ATTENTIONS), default="einsum,blocked",
                    help=f"comma list of model.attention, the first the baseline ({', '.join(LONGCTX_ATTENTIONS)})")
    lc.add_argument("--png", help="the plot (default: longctx.png beside --out)")
    q = sub.add_parser("quality", parents=[common], help="GGUF types in llama.cpp against atlas_jax: size, logits, ppl")
    q.add_argument("--checkpoint", help="a trained run dir")
    q.add_argument("--ftypes", type=names_from((*ALL_FTYPES, "q4_0-rtn")),
                   default="f32,f16,bf16,q8_0,q4_0,q4_0-rtn,q4_k_m,q5_k_m,q6_k")
    q.add_argument("--windows", type=positive_int, default=16,
                   help="validation windows of data.seq_len tokens (default 16)")
    sub.add_parser("hf", parents=[common], help="Hugging Face import/export of a 124M GPT-2 vs transformers: time, RSS")
    sub.add_parser("finetune", parents=[common], help="full fine-tuning vs LoRA vs QLoRA-style: params, memory, step")
    sub.add_parser("moe", parents=[common], help="MoE (8 experts, top-2) vs dense with the same active params; "
                   "grouped vs ragged vs dense dispatch")
    args = p.parse_args(argv)

    # Everything a run will need is checked before the first measurement (minutes of them): the
    # output files, the config(s), the checkpoint, the corpus.
    out = Path(args.out)
    md = Path(args.md) if args.md else out.with_suffix(".md")
    check_outputs(out, md, args.md is not None)
    check_inputs(args, out)
    from atlas_jax import compile_cache
    compile_cache.setup()  # the children inherit it through JAX_* variables; ATLAS_COMPILE_CACHE=0 turns it off
    section = {"train": cmd_train, "decode": cmd_decode, "scaling": cmd_scaling,
               "longctx": cmd_longctx, "quality": cmd_quality, "hf": cmd_hf, "finetune": cmd_finetune,
               "moe": cmd_moe}[args.command](args)
    section["command"] = "python scripts/bench.py " + shlex.join(argv)
    section["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    section["quick"] = args.quick
    data = write_outputs(args.command, section, out, md)
    busy = max(section["load_avg_start"][0], section["load_avg_end"][0])
    if busy > 0.5 * cores():
        log(f"note: load average {busy} on {cores()} cores while measuring; the figures are noisy")
    print(render_markdown({"machine": data["machine"], "versions": data["versions"], args.command: section}))
    log(f"wrote {out} and {md}")
    return 0


def check_inputs(args, out: Path) -> None:
    """The config (and each --sizes config), --checkpoint and --corpus, as the subcommand will read them."""
    if args.command in ("decode", "quality") and args.checkpoint:
        from atlas_jax.checkpoint import find_checkpoint
        from atlas_jax.errors import CheckpointError

        try:
            find_checkpoint(args.checkpoint)  # a missing run, or one without a checkpoint
        except CheckpointError as e:
            raise BenchError(f"--checkpoint {e}") from None
        if args.config or args.overrides:
            given = " ".join(filter(None, [args.config and f"--config {args.config}", *args.overrides]))
            raise BenchError(f"{args.command}: {given} does not apply with --checkpoint (the run's own config is "
                             f"used); leave it out, or leave out --checkpoint to measure that config")
    if args.command == "quality":
        if not args.checkpoint:
            raise BenchError("quality: pass --checkpoint RUN_DIR (a trained run: quality of random weights "
                             "means little)")
        return
    bench_config(args)  # a missing or bad --config, a bad override: one line now, not after a measurement
    if args.command == "decode":
        tools = args.llamacpp_tools and Path(args.llamacpp_tools)
        if tools and not tools.is_dir():
            raise BenchError(f"--llamacpp-tools {tools}: no such directory; give the directory that holds "
                             f"llama-bench and llama-batched-bench, or leave it out (default: the cache that "
                             f"python scripts/build_llamacpp_tools.py builds)")
        corpus = Path(args.corpus)
        if corpus.is_dir():
            raise BenchError(f"--corpus {corpus}: is a directory; give a UTF-8 text file")
        if not args.checkpoint and not corpus.is_file():
            raise BenchError(f"--corpus {corpus}: corpus not found; pass --corpus FILE.txt (or --checkpoint RUN_DIR)")
        if corpus.is_file():  # the tokenizer (without --checkpoint) and the prompts are read from it
            data = corpus.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BenchError(f"--corpus {corpus}: not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset "
                                 f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
            if not args.checkpoint and not text.strip():
                raise BenchError(f"--corpus {corpus}: no text (the file is empty or only whitespace); the "
                                 f"tokenizer is trained on it: give a text file")
    if args.command == "scaling":
        scaling_configs(args)
    if args.command in ("scaling", "longctx"):
        check_png(Path(args.png) if args.png else out.with_name(f"{args.command}.png"),
                  "--png" if args.png else f"--png (default, beside --out {out})")


def cli() -> None:
    """The console entry point (scripts/bench.py, python -m atlas_jax.bench)."""
    run_cli(main)
