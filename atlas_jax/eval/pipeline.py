"""The alignment pipeline on the synthetic arithmetic task, measured end to end in one command.

    python -m atlas_jax.eval.pipeline --out runs/arith            # 9.3 minutes measured on 2 CPU cores (docs/pipeline.md)
    python -m atlas_jax.eval.pipeline --out /tmp/arith --quick    # a minute: every stage, tiny budgets

Stages (each a run directory under --out; training goes through `python -m atlas_jax.train`):
  data      train / held-out problems (atlas_jax.eval.arith: disjoint triples), written as JSONL
  base      a llama pretrained from scratch on the train problems as text ("Question: ...\\nAnswer: ...")
  sft       base -> SFT on the train problems as chat (user: question, assistant: worked answer)
  dpo       sft -> DPO (with RPO's NLL term, train.rpo_alpha=1) on pairs from the SFT model's own samples on
            train problems: an incorrect sample
            rejected (correct = its '####' answer is the true one), a correct sample chosen, or the
            reference answer where none of the samples is correct (the counts of each are reported)
  verifier  sft's transformer + a scalar head (atlas_jax.finetune.verifier), trained on the same
            samples labelled correct / incorrect
  evaluate  held-out accuracy of: base, sft and dpo greedy; the verifier's best-of-n over n samples of
            the best policy; revise-and-retry (draw again while the verifier's P(correct) is below the
            threshold, at most n draws); self-consistency (majority vote over the n samples)

Every accuracy comes with its 95% Wilson interval, and every row after the first with the paired
difference to the row it builds on and that difference's 95% interval (normal approximation over the
problems); a difference whose interval holds 0 is reported as "no measurable gain". The calculator
column is the share of completions whose working (every "x op y = z") holds. Written to --out:
results.json (every figure and the commands), results.md (the table) and accuracy_vs_samples.png
(best-of-n and majority vote against the number of samples).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from atlas_jax.errors import AtlasError, run_cli

# the sizes of the default run, chosen to fit 30 minutes on 2 CPU cores; --quick shrinks every one
DEFAULTS = dict(n_train=20000, n_heldout=1000, base_steps=1500, sft_steps=400, dpo_steps=200,
                dpo_problems=2000, verifier_steps=1200, n_samples=8, temperature=0.5, threshold=0.5)
QUICK = dict(n_train=600, n_heldout=40, base_steps=30, sft_steps=10, dpo_steps=6, dpo_problems=40,
             verifier_steps=10, n_samples=4, temperature=0.5, threshold=0.5)
MODEL = dict(arch="llama", vocab_size=512, d_model=128, n_layers=4, n_heads=4, max_seq_len=128, dropout=0.0)
BATCH_ROWS = 256  # rows per sampling call (a fixed shape: one compile per prompt bucket)
MAX_NEW_TOKENS = 32  # a worked answer is 10-25 tokens (digits are single pieces), then the end-of-turn text


class PipelineError(AtlasError):
    pass


# --------------------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (mid - half, mid + half)


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """mean(b - a) over the same problems and its 95% interval (normal approximation)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(d.mean() - z * se), float(d.mean() + z * se)


# --------------------------------------------------------------------------- policies


def answer_of(completion: str) -> int | None:
    """The integer that starts the text after the completion's last '####' ("#### 85" -> 85), or None."""
    from atlas_jax.eval.metrics import final_answer

    found = re.match(r"-?\d+", final_answer(completion)) if "####" in completion else None
    return int(found.group()) if found else None


class Policy:
    """A run's model, prompting as it was trained: plain "Question: q\\nAnswer:" text (base) or the
    run's chat template (sft, dpo)."""

    def __init__(self, run: Path, chat: bool):
        import jax

        from atlas_jax.checkpoint import find_checkpoint
        from atlas_jax.eval.tasks import reply_stops
        from atlas_jax.finetune.templates import run_template
        from atlas_jax.init_from import load_model
        from atlas_jax.tokenizer import Tokenizer

        params, self.cfg, tok_path = load_model(run)
        self.params = jax.device_put(params)
        self.tokenizer = Tokenizer.load(tok_path)
        self.template = run_template(find_checkpoint(run)[0]) if chat else None
        if chat and self.template is None:
            raise PipelineError(f"{run}: no chat template in the run; was it trained with train.objective=sft?")
        self.stops = reply_stops(self.template)

    def prompt_text(self, question: str) -> str:
        if self.template is None:
            return f"Question: {question}\nAnswer:"
        return self.template.render([{"role": "user", "content": question}], add_generation_prompt=True)

    def conversation_ids(self, question: str, completion: str) -> list[int]:
        """The tokens a verifier reads: the prompt and the completion as the policy was trained on them
        (the whole conversation rendered by the template), then EOS."""
        if self.template is None:
            text = f"{self.prompt_text(question)} {completion}"
        else:
            text = self.template.render([{"role": "user", "content": question},
                                         {"role": "assistant", "content": completion}])
        return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def complete(self, questions: list[str], n: int, temperature: float, seed: int, bar=None) -> list[list[str]]:
        """n completions per question (greedy when temperature == 0): row (i, j) draws with the key
        fold_in(fold_in(key(seed), i), j), so a question's samples do not depend on the batch."""
        import jax
        import jax.numpy as jnp

        from atlas_jax.eval.tasks import cut_at_stop
        from atlas_jax.sample import generate

        sample_cfg = dataclasses.replace(self.cfg.sample, temperature=temperature, top_k=0, top_p=1.0,
                                         max_new_tokens=MAX_NEW_TOKENS)
        prompts = [self.tokenizer.encode(self.prompt_text(q)) for q in questions]
        rows = [(i, j) for i in range(len(questions)) for j in range(n)]
        base = jax.random.key(seed)
        keys_of = jax.jit(jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j)))
        out: list[list[str]] = [[] for _ in questions]
        eos = self.tokenizer.eos_id
        for start in range(0, len(rows), BATCH_ROWS):
            chunk = rows[start:start + BATCH_ROWS]
            padded = chunk + [chunk[0]] * (BATCH_ROWS - len(chunk))  # one shape for every call
            ii, jj = (jnp.asarray([r[k] for r in padded], jnp.uint32) for k in (0, 1))
            tokens, lengths = generate(self.params, [prompts[i] for i, _ in padded], keys_of(ii, jj), sample_cfg,
                                       self.cfg.model, eos_id=eos, pad_id=self.tokenizer.pad_id)
            tokens, lengths = jax.device_get((tokens, lengths))
            for (i, _), row, m in zip(chunk, tokens, lengths):
                text = self.tokenizer.decode([int(t) for t in row[:m] if t != eos])
                out[i].append(cut_at_stop(text, self.stops)[0].strip())
            if bar is not None:
                bar.update(len(chunk))
        return out


# --------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Pipeline:
    out: Path
    sizes: dict
    seed: int = 0
    progress: bool = True
    log: list = dataclasses.field(default_factory=list)  # (stage, seconds, command)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, file=sys.stderr,
                    disable=not self.progress, leave=False)

    def _say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def train(self, name: str, config: dict) -> Path:
        """Write <out>/<name>.yaml and run `python -m atlas_jax.train` on it (a finished run resumes
        at its last step and returns at once)."""
        import yaml

        from atlas_jax.files import atomic_write_text

        path = self.out / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "atlas_jax.train", "--config", str(path), "--no-samples"]
        if not self.progress:
            cmd.append("--no-progress")
        self._say(f"[{name}] {' '.join(cmd[1:])}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=os.environ.copy())
        if proc.returncode != 0:
            raise PipelineError(f"stage {name}: the trainer exited with {proc.returncode} (its config: {path}); "
                                f"fix it and rerun: finished stages are kept")
        self.log.append((name, time.perf_counter() - start, " ".join(["python"] + cmd[1:])))
        return Path(config["train"]["run_dir"])

    def timed(self, name: str, fn):
        start = time.perf_counter()
        value = fn()
        self.log.append((name, time.perf_counter() - start, None))
        return value


def _train_config(run_dir: Path, sources: list[str], steps: int, lr: float, **train) -> dict:
    return {"data": {"sources": sources, "seq_len": 96, "val_fraction": 0.02},
            "train": {"run_dir": str(run_dir), "batch_size": 32, "steps": steps, "lr": lr,
                      "warmup_steps": max(1, steps // 10), "min_lr": lr / 10, "log_interval": max(1, steps // 10),
                      "eval_interval": steps, "eval_batches": 4, "checkpoint_interval": steps, "keep": 1,
                      "tracking": "none", **train}}


def _tokenizer(data: Path, problems) -> Path:
    """A sentencepiece BPE (digits split) trained on the problems as base text and as chat, so the
    chat template's markers are a few pieces, not a dozen bytes."""
    from atlas_jax.finetune.templates import load_template
    from atlas_jax.tokenizer import train_tokenizer

    chat = load_template("chatml")
    texts = [f"Question: {x.question}\nAnswer: {x.completion}" for x in problems]
    texts += [chat.render([{"role": "user", "content": x.question}, {"role": "assistant", "content": x.completion}])
              for x in problems[:2000]]
    return train_tokenizer(iter(texts), data / "tokenizer", MODEL["vocab_size"]).path


def run(p: Pipeline) -> dict:
    from atlas_jax.eval import arith
    from atlas_jax.finetune.shakespeare import write_jsonl

    s, out = p.sizes, p.out
    total_start = time.perf_counter()
    train_set, heldout = arith.make_split(s["n_train"], s["n_heldout"], p.seed)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl([{"text": f"Question: {x.question}\nAnswer: {x.completion}"} for x in train_set], data / "base.jsonl")
    write_jsonl([{"prompt": x.question, "completion": x.completion} for x in train_set], data / "sft.jsonl")
    write_jsonl([{"prompt": x.question, "answer": str(x.answer)} for x in heldout], data / "heldout.jsonl")
    p._say(f"[data] {len(train_set):,} train / {len(heldout):,} held-out problems in {data}")
    tokenizer = p.timed("tokenizer", lambda: _tokenizer(data, train_set))


    # base: pretrained from scratch on the train problems' text
    base_cfg = _train_config(out / "base", [str(data / "base.jsonl")], s["base_steps"], 2e-3, seed=p.seed)
    base_cfg["data"].update(seq_len=64, tokenizer=str(tokenizer))
    base_cfg["model"] = dict(MODEL)
    base = p.train("base", base_cfg)
    sft_cfg = _train_config(out / "sft", [str(data / "sft.jsonl")], s["sft_steps"], 5e-4, objective="sft",
                            init_from=f"run:{base}", seed=p.seed)
    sft_cfg["data"].update(chat_template="chatml", pack=True)
    sft = p.train("sft", sft_cfg)

    # the SFT model's own samples on train problems: DPO pairs and the verifier's labelled examples
    sft_policy = Policy(sft, chat=True)
    pool = train_set[:s["dpo_problems"]]
    n = s["n_samples"]
    with p._bar(len(pool) * n, "sft samples (train)") as bar:
        samples = p.timed("sample sft on train", lambda: sft_policy.complete(
            [x.question for x in pool], n, s["temperature"], p.seed + 1, bar))
    pairs, examples, labels = [], [], []
    for x, comps in zip(pool, samples):
        ok = [answer_of(c) == x.answer for c in comps]
        for c, good in zip(comps, ok):
            examples.append(sft_policy.conversation_ids(x.question, c))
            labels.append(int(good))
        right = [c for c, g in zip(comps, ok) if g]
        wrong = [c for c, g in zip(comps, ok) if not g]
        if wrong:  # chosen: a correct sample, else (the model never solved it) the reference answer
            pairs.append({"prompt": x.question, "chosen": right[0] if right else x.completion, "rejected": wrong[0],
                          "chosen_from": "sample" if right else "reference"})
    if not pairs:
        raise PipelineError(f"every one of the SFT model's {len(examples)} samples on {len(pool)} train problems is "
                            f"correct: no pair to prefer; raise the sample temperature")
    own = sum(r["chosen_from"] == "sample" for r in pairs)
    write_jsonl(pairs, data / "dpo.jsonl")
    write_jsonl([{"prompt": x.question, "answer": x.answer, "samples": comps} for x, comps in zip(pool, samples)],
                data / "sft_samples_train.jsonl")
    p._say(f"[dpo data] {len(pairs):,} pairs from {len(pool):,} problems x {n} samples ({own:,} with a correct "
           f"sample chosen, {len(pairs) - own:,} with the reference answer); {np.mean(labels):.1%} of the samples correct")
    # RPO (DPO + the chosen replies' NLL) at a low rate: plain DPO at 1e-4 halved the SFT model's accuracy here
    dpo_cfg = _train_config(out / "dpo", [str(data / "dpo.jsonl")], s["dpo_steps"], 3e-5, objective="dpo",
                            init_from=f"run:{sft}", dpo_beta=0.1, rpo_alpha=1.0, dpo_reference="once", seed=p.seed)
    dpo_cfg["data"].update(chat_template="chatml", val_fraction=0.05)
    dpo = p.train("dpo", dpo_cfg)

    # the verifier: sft's transformer + a scalar head, on the labelled samples
    from atlas_jax.finetune import verifier as V

    with p._bar(s["verifier_steps"], "verifier") as bar:
        losses = []

        def on_step(i, loss):
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")

        vparams = p.timed("train verifier", lambda: V.train_verifier(
            sft_policy.params, sft_policy.cfg.model, examples, labels, sft_policy.tokenizer.pad_id,
            s["verifier_steps"], seed=p.seed, on_step=on_step))
    _save_verifier(out / "verifier", vparams, sft_policy.cfg, losses)

    # evaluate on the held-out problems
    questions, truth = [x.question for x in heldout], np.array([x.answer for x in heldout])
    rows, per_problem = [], {}

    def add(name: str, builds_on: str | None, correct: np.ndarray, completions: list[str], samples_used: float,
            command: str):
        from atlas_jax.eval.metrics import check_working

        k = int(correct.sum())
        row = {"stage": name, "accuracy": k / len(correct), "ci95": wilson(k, len(correct)), "correct": k,
               "problems": len(correct), "samples_per_problem": samples_used,
               "calculator": float(np.mean([check_working(c) is True for c in completions])),
               "builds_on": builds_on, "how": command}
        if builds_on is not None:
            row["difference"] = paired_difference(per_problem[builds_on], correct)
        per_problem[name] = correct
        rows.append(row)
        p._say(f"[eval] {name}: {row['accuracy']:.3f} ({k}/{len(correct)})")

    greedy = {}
    for name, run_dir, chat, builds_on in (("base", base, False, None), ("sft", sft, True, "base"),
                                           ("dpo", dpo, True, "sft")):
        policy = sft_policy if name == "sft" else Policy(run_dir, chat=chat)
        with p._bar(len(questions), f"{name} greedy") as bar:
            comps = p.timed(f"evaluate {name}", lambda: [c[0] for c in policy.complete(questions, 1, 0.0, 0, bar)])
        greedy[name] = policy
        correct = np.array([answer_of(c) == t for c, t in zip(comps, truth)])
        add(name, builds_on, correct, comps, 1, f"greedy ({'chat template' if chat else 'Question:/Answer: text'})")

    best = "dpo" if rows[-1]["accuracy"] >= rows[-2]["accuracy"] else "sft"
    policy = greedy[best]
    with p._bar(len(questions) * n, f"{best} samples (held-out)") as bar:
        samples = p.timed(f"sample {best} on held-out", lambda: policy.complete(
            questions, n, s["temperature"], p.seed + 2, bar))
    flat = [policy.conversation_ids(q, c) for q, comps in zip(questions, samples) for c in comps]
    score_NxS = p.timed("verifier scores", lambda: V.scores(vparams, sft_policy.cfg.model, flat,
                                                               policy.tokenizer.pad_id)).reshape(len(questions), n)
    answers = [[answer_of(c) for c in comps] for comps in samples]
    ok_NxS = np.array([[a == t for a in row] for row, t in zip(answers, truth)])

    write_jsonl([{"prompt": q, "answer": int(t), "samples": comps, "verifier_logits": [float(v) for v in row]}
                 for q, t, comps, row in zip(questions, truth, samples, score_NxS)], data / f"{best}_samples_heldout.jsonl")
    pick = score_NxS.argmax(axis=1)
    add(f"{best} + verifier best-of-{n}", best, ok_NxS[np.arange(len(pick)), pick],
        [samples[i][j] for i, j in enumerate(pick)], n, f"{n} samples at temperature {s['temperature']}, "
        f"the verifier's highest score")
    prob_NxS = 1 / (1 + np.exp(-score_NxS))
    accept = prob_NxS >= s["threshold"]
    first = np.where(accept.any(axis=1), accept.argmax(axis=1), n - 1)  # the first accepted draw, else the last
    add(f"{best} + revise-and-retry (P >= {s['threshold']}, <= {n} draws)", best, ok_NxS[np.arange(len(first)), first],
        [samples[i][j] for i, j in enumerate(first)], float(np.mean(first + 1)),
        "draw again while the verifier's P(correct) < threshold")
    votes = [_vote(row) for row in answers]
    vote_idx = [row.index(v) if v is not None else 0 for row, v in zip(answers, votes)]
    add(f"{best} + self-consistency ({n} votes)", best, np.array([v == t for v, t in zip(votes, truth)]),
        [samples[i][j] for i, j in enumerate(vote_idx)], n, "majority vote over the samples' answers")

    curve = _curves(score_NxS, answers, truth, ok_NxS)
    result = {"sizes": s, "seed": p.seed, "model": MODEL, "policy_sampled": best, "dpo_pairs": len(pairs), "dpo_pairs_sample_chosen": own,
              "verifier_examples": len(examples), "verifier_positive_share": float(np.mean(labels)),
              "verifier_final_loss": float(np.mean(losses[-50:])), "rows": rows, "curve": curve,
              "stages": [{"stage": name, "seconds": sec, "command": cmd} for name, sec, cmd in p.log],
              "total_seconds": time.perf_counter() - total_start}
    return result


def _vote(answers: list[int | None]) -> int | None:
    """Majority vote over the parsed answers (samples without one abstain; ties: the first seen)."""
    counts: dict[int, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def _curves(score_NxS, answers, truth, ok_NxS) -> list[dict]:
    """Accuracy of best-of-m, majority vote over m and pass@m (any correct) for m = 1..n, using each
    problem's first m samples."""
    out = []
    for m in range(1, score_NxS.shape[1] + 1):
        pick = score_NxS[:, :m].argmax(axis=1)
        votes = [_vote(row[:m]) for row in answers]
        out.append({"samples": m, "best_of": float(ok_NxS[np.arange(len(pick)), pick].mean()),
                    "majority": float(np.mean([v == t for v, t in zip(votes, truth)])),
                    "any_correct": float(ok_NxS[:, :m].any(axis=1).mean())})
    return out


def _save_verifier(run_dir: Path, vparams, cfg, losses: list[float]) -> None:
    """verifier.msgpack (flax serialization of {"lm", "head"}) and verifier.json, each written to a
    temporary name and renamed."""
    import jax
    from flax import serialization

    from atlas_jax.files import atomic_write_bytes, atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "verifier.msgpack", serialization.to_bytes(jax.device_get(vparams)))
    atomic_write_text(run_dir / "verifier.json", json.dumps(
        {"model": dataclasses.asdict(cfg.model), "steps": len(losses),
         "final_loss": float(np.mean(losses[-50:])) if losses else None}, indent=2) + "\n")


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    from atlas_jax.eval.report import table

    body = []
    for r in result["rows"]:
        lo, hi = r["ci95"]
        if "difference" in r:
            d, dlo, dhi = r["difference"]
            verdict = "gain" if dlo > 0 else "loss" if dhi < 0 else "no measurable gain"
            diff = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] vs {r['builds_on']}: {verdict}"
        else:
            diff = ""
        body.append([r["stage"], f"{r['accuracy']:.3f}", f"[{max(lo, 0.0):.3f}, {min(hi, 1.0):.3f}]", r["problems"],
                     r["samples_per_problem"], f"{r['calculator']:.3f}", diff])
    return table(["stage", "accuracy", "95% CI", "problems", "samples / problem", "calculator ok", "paired difference"],
                 body)


def curve_png(path: Path, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curve"]
    m = [x["samples"] for x in c]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("best_of", "verifier best-of-m"), ("majority", "majority vote over m"),
                       ("any_correct", "any of m correct (pass@m)")):
        ax.plot(m, [x[key] for x in c], marker="o", label=label)
    for r in result["rows"][:3]:
        ax.axhline(r["accuracy"], ls=":", lw=1, color="gray")
        ax.annotate(f"{r['stage']} greedy", (m[-1], r["accuracy"]), fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("samples per problem (m)")
    ax.set_ylabel(f"held-out accuracy ({result['rows'][0]['problems']} problems)")
    ax.set_title(f"arithmetic: {result['policy_sampled']} samples at T={result['sizes']['temperature']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m atlas_jax.eval.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the pipeline's directory (runs, data, results)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: every stage in about a minute (a smoke run)")
    ap.add_argument("--heldout", type=int, help=f"held-out problems (default {DEFAULTS['n_heldout']})")
    ap.add_argument("--samples", type=int, help=f"samples per problem, n (default {DEFAULTS['n_samples']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    from atlas_jax.eval import report
    from atlas_jax.files import writable_dir

    from atlas_jax import compile_cache

    compile_cache.setup()  # ATLAS_COMPILE_CACHE=0 turns it off
    sizes = dict(QUICK if args.quick else DEFAULTS)
    for flag, key, low in (("heldout", "n_heldout", 1), ("samples", "n_samples", 2)):
        value = getattr(args, flag)
        if value is not None:
            if value < low:
                raise PipelineError(f"--{flag} {value}: must be at least {low}")
            sizes[key] = value
    out = writable_dir(args.out, "--out")
    result = run(Pipeline(out.resolve(), sizes, args.seed, args.progress))
    result["command"] = "python -m atlas_jax.eval.pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    report.write_json(out / "results.json", result)
    md = markdown(result)
    from atlas_jax.files import atomic_write_text

    atomic_write_text(out / "results.md", md + "\n")
    curve_png(out / "accuracy_vs_samples.png", result)
    print(md)
    print(f"total {result['total_seconds'] / 60:.1f} min; wrote {out / 'results.json'}, {out / 'results.md'}, "
          f"{out / 'accuracy_vs_samples.png'}", file=sys.stderr)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
