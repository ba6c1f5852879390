"""Benchmarks: figures, never pass/fail. Each measurement runs in its own child process.

    python scripts/bench.py train   [--config configs/shakespeare.yaml] [section.key=value ...]
    python scripts/bench.py decode  [--checkpoint RUN_DIR]
    python scripts/bench.py scaling
    python scripts/bench.py quality --checkpoint RUN_DIR
    ... --quick        tiny sizes and few steps: a smoke test, each subcommand under a minute on a
                       quiet 2-core machine (the first torch.compile on a machine adds ~1 minute)

- train: the same model, batch and sequence length through atlas_jax's jitted `train_step`
  (make_mesh + create_sharded_state), atlas_torch_ref eager and atlas_torch_ref under
  torch.compile, from the same initial params, AdamW with the same settings on both sides. Median
  step time after warm-up (pooled over --rounds interleaved rounds), tokens/s, MFU, peak memory,
  atlas_jax's speed-up over each.
- decode: greedy prefill and decode tokens/s at batch 1 and 32, atlas_jax (`sample.generate`)
  against llama.cpp on GGUF files exported from the same params (f32 and q8_0).
- scaling: atlas_jax (and torch eager) tokens/s as the sequence grows and as the model grows.
- quality: every GGUF type of a trained run in llama.cpp against atlas_jax: file size, max
  |dlogit|, top-1 agreement, validation perplexity, greedy continuation.

Results merge into --out (JSON, default docs/benchmarks.json, one section per subcommand) and are
rendered as tables into --md (default: --out with .md) between the `bench:begin/end` markers,
with the machine, the library versions and the exact command of each section.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from atlas_jax.bench.common import CORPUS, ENV_PREFIXES, REPO, cores, log
from atlas_jax.bench.decode import cmd_decode
from atlas_jax.bench.quality import cmd_quality
from atlas_jax.bench.report import render_markdown, write_outputs
from atlas_jax.bench.scaling import SIZES, cmd_scaling
from atlas_jax.bench.train import FRAMEWORKS, cmd_train
from atlas_jax.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: configs/shakespeare.yaml; --quick: configs/tiny.yaml)")
    common.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.d_model=256 data.seq_len=256")
    common.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    common.add_argument("--steps", type=int, help="timed steps (default 10; scaling 5; --quick 3/2)")
    common.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 2; --quick 1)")
    common.add_argument("--out", default=str(REPO / "docs" / "benchmarks.json"), help="JSON results (merged)")
    common.add_argument("--md", help="markdown tables (default: --out with .md)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="atlas_jax vs torch eager vs torch.compile, one train step")
    t.add_argument("--rounds", type=int, help="times each framework is run, interleaved (default 3; --quick 1)")
    t.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma list of {', '.join(FRAMEWORKS)}")
    d = sub.add_parser("decode", parents=[common], help="atlas_jax vs llama.cpp greedy decoding")
    d.add_argument("--checkpoint", help="a trained run dir (its params, config and tokenizer)")
    d.add_argument("--corpus", default=str(CORPUS), help="text for the tokenizer and the prompts")
    d.add_argument("--prompt-len", type=int, help="prompt tokens per sequence (default 128; --quick 16)")
    d.add_argument("--new-tokens", type=int, help="generated tokens per sequence (default 128; --quick 16)")
    d.add_argument("--batches", default="1,32", help="batch sizes (sequences decoded together)")
    d.add_argument("--ftypes", default="f32,q8_0", help="GGUF types for llama.cpp")
    d.add_argument("--threads", type=int, help=f"llama.cpp threads (default: the {cores()} cores here)")
    d.add_argument("--reps", type=int, help="timed repetitions (default 3; --quick 1)")
    s = sub.add_parser("scaling", parents=[common], help="tokens/s against sequence length and model size")
    s.add_argument("--seq-lens", help="default 256,512,1024,2048 (--quick 32,64)")
    s.add_argument("--tokens-per-step", type=int, help="batch x seq at every point (default 8192; --quick 256)")
    s.add_argument("--sizes", help=f"configs by name ({', '.join(SIZES)}) or YAML path (default: all three)")
    s.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="torch eager beside atlas_jax (default: yes, except with --quick)")
    s.add_argument("--png", help="the plot (default: scaling.png beside --out)")
    q = sub.add_parser("quality", parents=[common], help="GGUF types in llama.cpp against atlas_jax: size, logits, ppl")
    q.add_argument("--checkpoint", help="a trained run dir")
    q.add_argument("--ftypes", default="f32,f16,bf16,q8_0,q4_0,q4_0-rtn,q4_k_m,q5_k_m,q6_k")
    q.add_argument("--windows", type=int, default=16, help="validation windows of data.seq_len tokens (default 16)")
    args = p.parse_args(argv)

    out = Path(args.out)
    md = Path(args.md) if args.md else out.with_suffix(".md")
    section = {"train": cmd_train, "decode": cmd_decode, "scaling": cmd_scaling,
               "quality": cmd_quality}[args.command](args)
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


def cli() -> None:
    """The console entry point (scripts/bench.py, python -m atlas_jax.bench)."""
    run_cli(main)
