"""Evaluate a model: perplexity / bits per byte on text, or task metrics on a JSONL file.

    python -m atlas_jax.eval ppl --checkpoint runs/shakespeare --val
    python -m atlas_jax.eval ppl --gguf model.gguf --val runs/shakespeare --window 256 --stride 128
    python -m atlas_jax.eval ppl --checkpoint runs/shakespeare --text tinyshakespeare --out ppl.json --plot bpb.png
    python -m atlas_jax.eval tasks --checkpoint runs/sft --data tasks.jsonl --metrics exact_match,f1,pass_at_k --n 5 --k 1 --chat
    python -m atlas_jax.eval lm-eval --checkpoint runs/shakespeare --tasks my_mc,my_ppl --include-path tasks/ --limit 100

ppl: strided perplexity (every token scored once; windows of --window tokens, each after the first
scoring its last --stride; atlas_jax/eval/perplexity.py). Each document starts after a start token
(EOS for Atlas, BOS or EOS for a GGUF file as its add_bos_token says) so all its tokens are scored,
and bits per byte divide by the documents' UTF-8 bytes: any model, any tokenizer, the same text is
comparable. A GGUF file is scored by llama.cpp with its own tokenizer. --val [RUN] is a run's val
split (default: --checkpoint's), decoded to text.

tasks: rows {"prompt", "answer"} or {"prompt", "references": [...]}; greedy completions for the
single-sample metrics and the latency, --n samples at the run's sample temperature for pass_at_k and
self_consistency (atlas_jax/eval/tasks.py, metrics.py). Prints a markdown table; --out writes JSON
with every row.

lm-eval: lm-evaluation-harness tasks (built-in, or YAML under --include-path) on a run (the `atlas`
model of atlas_jax/eval/harness.py) or a GGUF file (`atlas-gguf`, llama.cpp); prints lm-eval's table,
--out writes its results as JSON.
Tasks all found under --include-path are indexed alone, not with lm-eval's ~15k built-in ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from atlas_jax.errors import run_cli

GGUF_DEFAULT_WINDOW_CAP = 2048  # a GGUF file's default --window: its context length, at most this


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from atlas_jax.eval.metrics import METRICS

    p = argparse.ArgumentParser(prog="python -m atlas_jax.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("ppl", help="perplexity and bits per byte of a run or a GGUF file on text")
    model = ppl.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="an Atlas run directory or checkpoint step directory")
    model.add_argument("--gguf", type=Path, help="a GGUF file, scored by llama.cpp with its own tokenizer")
    text = ppl.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="a text/JSONL file, a corpus name, a directory or a glob")
    text.add_argument("--val", nargs="?", const="", metavar="RUN",
                      help="a run's val split (default: the --checkpoint run)")
    ppl.add_argument("--window", type=int, help="tokens per window (default: the model's context length)")
    ppl.add_argument("--stride", type=int, help="targets each window after the first scores (default: window // 2)")
    ppl.add_argument("--text-field", default="text", help="the field of a .jsonl --text holding the text")
    ppl.add_argument("--batch-size", type=int, default=8, help="Atlas: windows per forward (default 8)")
    ppl.add_argument("--threads", type=int, default=2, help="GGUF: llama.cpp threads (default 2)")
    ppl.add_argument("--out", type=Path, help="write the results as JSON")
    ppl.add_argument("--plot", type=Path, help="write a PNG of bits per byte against context length")
    ppl.add_argument("--no-progress", dest="progress", action="store_false")

    tasks = sub.add_parser("tasks", help="task metrics of a run on a JSONL file of prompts and answers")
    tasks.add_argument("--checkpoint", required=True, help="an Atlas run directory or checkpoint step directory")
    tasks.add_argument("--data", required=True, type=Path, help="JSONL: prompt and answer (or references)")
    tasks.add_argument("--metrics", default="exact_match,f1", help=f"comma-separated, of: {', '.join(METRICS)}")
    tasks.add_argument("--n", type=int, default=5, help="samples per prompt for pass_at_k, self_consistency")
    tasks.add_argument("--k", type=int, default=1, help="pass@k's k (<= --n)")
    tasks.add_argument("--chat", action="store_true", help="prompts are user turns in the run's chat template")
    tasks.add_argument("--chat-template", help="with --chat: a built-in (chatml) or .jinja file instead of the run's")
    tasks.add_argument("--max-new-tokens", type=int, default=32, help="per completion (default 32)")
    tasks.add_argument("--stop", action="append", default=[], help="cut completions at this text (repeatable)")
    tasks.add_argument("--temperature", type=float, help="sampled metrics (default: the run's sample.temperature)")
    tasks.add_argument("--top-k", type=int, help="sample.top_k")
    tasks.add_argument("--top-p", type=float, help="sample.top_p")
    tasks.add_argument("--seed", type=int, help="sample.seed")
    tasks.add_argument("--out", type=Path, help="write the results (every row) as JSON")
    tasks.add_argument("--no-progress", dest="progress", action="store_false")

    lm = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a run (the atlas model)")
    lm_model = lm.add_mutually_exclusive_group(required=True)
    lm_model.add_argument("--checkpoint", help="an Atlas run directory or checkpoint step directory")
    lm_model.add_argument("--gguf", type=Path, help="a GGUF file, through llama.cpp with its own tokenizer")
    lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (globs allowed)")
    lm.add_argument("--include-path", type=Path, help="a directory of task YAML files of your own")
    lm.add_argument("--limit", type=int, help="at most this many documents per task")
    lm.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    lm.add_argument("--batch-size", type=int, default=8, help="requests per forward (default 8)")
    lm.add_argument("--max-length", type=int, help="tokens of context (default: the model's max_seq_len)")
    lm.add_argument("--bootstrap-iters", type=int, default=100000, help="for stderrs (lm-eval's default; 0: none)")
    lm.add_argument("--out", type=Path, help="write lm-eval's results as JSON")
    return p.parse_args(argv)


def _bar(enabled: bool, total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=not enabled or total < 2, leave=False)


def _check_outputs(args) -> None:
    from atlas_jax.files import writable_file

    for flag in ("out", "plot"):
        if getattr(args, flag, None) is not None:
            writable_file(getattr(args, flag), f"--{flag}")


def ppl_main(args) -> int:
    from atlas_jax.eval import perplexity as P
    from atlas_jax.eval import report

    _check_outputs(args)
    if args.gguf is not None and not args.gguf.is_file():
        raise P.EvalError(f"--gguf {args.gguf}: no such file")
    if args.val == "" and args.checkpoint is None:
        raise P.EvalError("--val without a run: name it (--val RUN), since --gguf has no val split of its own")
    for flag in ("batch_size", "threads"):
        if getattr(args, flag) < 1:
            raise P.EvalError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.window is not None and args.stride is not None:  # before anything loads
        P.check_window(args.window, args.stride, None, "the model")
    docs = P.text_documents(args.text, args.text_field) if args.text is not None else \
        P.val_documents(args.val or args.checkpoint)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)

    if args.gguf is not None:
        info = P.gguf_info(args.gguf)  # a file llama.cpp cannot load stops here, in one line
        limit, name = info["n_ctx_train"], str(args.gguf)
        window = args.window or min(limit, GGUF_DEFAULT_WINDOW_CAP)
    else:
        from atlas_jax.init_from import load_model
        from atlas_jax.tokenizer import Tokenizer

        params, cfg, tokenizer_path = load_model(args.checkpoint)
        tokenizer = Tokenizer.load(tokenizer_path)
        limit, name = cfg.model.max_seq_len, str(args.checkpoint)
        window = args.window or limit
    stride = args.stride or max(1, window // 2)
    P.check_window(window, stride, limit, name)

    if args.gguf is not None:
        seqs = P.gguf_sequences(args.gguf, docs, info)
        plan = P.plan_windows([len(s) for s in seqs], window, stride)
        scored = P.score_gguf(args.gguf, seqs, plan, n_threads=args.threads)
    else:
        seqs = P.atlas_sequences(tokenizer, docs)
        plan = P.plan_windows([len(s) for s in seqs], window, stride)
        scored = P.score_atlas(params, cfg.model, seqs, plan, batch_size=args.batch_size)
    totals = P.Totals(window)
    with _bar(args.progress, len(plan), "window") as bar:
        for batch in scored:
            totals.add(batch)
            bar.update(len(batch))
    result = {"command": "ppl", "model": name, "kind": "gguf" if args.gguf is not None else "atlas",
              "text": args.text if args.text is not None else f"val of {args.val or args.checkpoint}",
              "documents": len(docs), "window": window, "stride": stride, "summary": totals.summary(n_bytes),
              "by_context": totals.by_context()}
    print(report.ppl_markdown(result))
    if args.out is not None:
        print(f"wrote {report.write_json(args.out, result)}", file=sys.stderr)
    if args.plot is not None:
        report.bpb_curve_png(args.plot, result["by_context"], result["summary"]["bytes_per_token"],
                             f"{name}: {result['text']} (window {window}, stride {stride})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def tasks_main(args) -> int:
    from atlas_jax.eval import report
    from atlas_jax.eval.metrics import SAMPLED
    from atlas_jax.eval.perplexity import EvalError
    from atlas_jax.eval.tasks import (
        AtlasGenerator,
        evaluate_tasks,
        parse_metrics,
        read_tasks,
    )

    metrics = parse_metrics(args.metrics)
    if args.n < 1:
        raise EvalError(f"--n {args.n}: must be at least 1 sample per prompt")
    if not 1 <= args.k <= args.n:
        raise EvalError(f"--k {args.k}: pass@k needs 1 <= k <= --n ({args.n})")
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    _check_outputs(args)
    rows = read_tasks(args.data)

    from atlas_jax.checkpoint import find_checkpoint
    from atlas_jax.init_from import load_model
    from atlas_jax.sample import check_sample_config
    from atlas_jax.tokenizer import Tokenizer

    params, cfg, tokenizer_path = load_model(args.checkpoint)
    flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    sample_cfg = dataclasses.replace(cfg.sample, **{k: v for k, v in flags.items() if v is not None})
    check_sample_config(sample_cfg)
    template = None
    if args.chat or args.chat_template:
        from atlas_jax.finetune.templates import load_template, run_template

        template = load_template(args.chat_template) if args.chat_template else \
            run_template(find_checkpoint(args.checkpoint)[0])
        if template is None:
            raise EvalError(f"{args.checkpoint}: --chat, but the run has no chat template (it was not fine-tuned "
                            f"with train.objective=sft/dpo); name one with --chat-template chatml")
    if any(m in SAMPLED for m in metrics) and sample_cfg.temperature == 0:
        print("note: temperature 0, so the --n samples are all the greedy completion", file=sys.stderr)
    model = AtlasGenerator(params, cfg, Tokenizer.load(tokenizer_path), template)
    with _bar(args.progress, len(rows), "prompt") as bar:
        result = evaluate_tasks(model, rows, metrics, args.n, args.k, args.max_new_tokens, sample_cfg,
                                stops=args.stop, on_row=lambda: bar.update(1))
    result = {"command": "tasks", "model": str(args.checkpoint), "data": str(args.data), **result}
    print(report.tasks_markdown(result))
    if args.out is not None:
        print(f"wrote {report.write_json(args.out, result)}", file=sys.stderr)
    return 0


def _task_manager(include_path: Path | None, names: list[str]):
    """lm-eval's TaskManager: --include-path's tasks alone when every name is a task there (indexing the
    built-in ones takes seconds), else with the built-ins; an unknown name is one line."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    from atlas_jax.eval.perplexity import EvalError

    if include_path is not None:
        if not include_path.is_dir():
            raise EvalError(f"--include-path {include_path}: no such directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([n]) for n in names) and all(
                local.task_index[t].kind in (Kind.TASK, Kind.PY_TASK) for t in local.match_tasks(names)):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        known = [t for t in ("hellaswag", "arc_easy", "lambada_openai", "wikitext") if t in manager.all_tasks]
        raise EvalError(f"--tasks {', '.join(unknown)}: unknown to lm-eval (it knows {len(manager.all_tasks)}, e.g. "
                        f"{', '.join(known or manager.all_tasks[:4])}); a task of your own needs its YAML directory "
                        f"as --include-path DIR")
    return manager


def lm_eval_main(args) -> int:
    import importlib.util

    from atlas_jax.eval.perplexity import EvalError

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("lm-eval needs lm-evaluation-harness, which is not installed; pip install -e '.[eval]'")

    for flag in ("limit", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    for flag in ("num_fewshot", "bootstrap_iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise EvalError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 0")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise EvalError("--tasks: no task named; give NAME[,NAME]")
    _check_outputs(args)
    if args.gguf is not None:
        if not args.gguf.is_file():
            raise EvalError(f"--gguf {args.gguf}: no such file")
        model, model_args = "atlas-gguf", {"gguf": str(args.gguf)}
    else:
        from atlas_jax.checkpoint import find_checkpoint

        find_checkpoint(args.checkpoint)  # a missing run stops here, before lm-eval indexes its tasks
        model, model_args = "atlas", {"checkpoint": str(args.checkpoint)}
    manager = _task_manager(args.include_path, names)

    import json

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    import atlas_jax.eval.harness  # noqa: F401  (registers the atlas model)

    if args.max_length is not None:
        model_args["max_length"] = args.max_length
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, task_manager=manager,
                                      num_fewshot=args.num_fewshot, batch_size=args.batch_size, limit=args.limit,
                                      bootstrap_iters=args.bootstrap_iters, log_samples=False)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out is not None:
        from atlas_jax.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2, default=handle_non_serializable))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from atlas_jax import compile_cache

    compile_cache.setup()  # ATLAS_COMPILE_CACHE=0 turns it off
    return {"ppl": ppl_main, "tasks": tasks_main, "lm-eval": lm_eval_main}[args.command](args)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
