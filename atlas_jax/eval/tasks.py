"""Task evaluation from JSONL: prompts in, completions from an Atlas model, metrics out.

    rows = read_tasks("tasks.jsonl")                 # {"prompt": ..., "answer": ...} or "references": [...]
    model = AtlasGenerator(params, cfg, tokenizer, template=None)
    result = evaluate_tasks(model, rows, ["exact_match", "pass_at_k"], n=5, k=1, max_new_tokens=32,
                            sample_cfg=cfg.sample)

Per row: one greedy completion (temperature 0) for the single-sample metrics and the latency, and,
when a sampled metric is asked for, `n` samples at sample_cfg's temperature/top-k/top-p (row i draws
with fold_in(key(seed), i), sample j as `generate` draws row j). A completion is the generated text up
to EOS, cut at the first --stop string. Its *answer* (what exact_match, f1, pass_at_k and
self_consistency compare) is `metrics.final_answer` of it (the text after a final '####', else the
whole completion), and so is each reference's; rouge_l, bleu and chrf compare whole completions with
whole references.

Latency (greedy pass): time to first token = from the call to the first generated token (prefill and
one step; the first prompt of each bucket length also compiles, hence the median), tokens/s = the
decode rate after the first token.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.eval import metrics as M
from atlas_jax.eval.perplexity import EvalError


@dataclasses.dataclass
class TaskRow:
    prompt: str
    references: list[str]
    where: str  # file:line, for messages


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in M.METRICS]
    if unknown or not names:
        raise EvalError(f"--metrics: unknown metric {', '.join(unknown) or '(none given)'}; known: "
                        f"{', '.join(M.METRICS)}")
    return list(dict.fromkeys(names))


def read_tasks(path: str | Path) -> list[TaskRow]:
    """Rows of a JSONL file: a string 'prompt' and a string 'answer' or a non-empty list of strings
    'references'; anything else is one line naming file:line and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"--data {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"--data {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EvalError(f"--data {path}: cannot read it ({e.strerror})") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{where}: a JSON {type(row).__name__}, expected an object with 'prompt' and 'answer'")
        found = ", ".join(map(str, row)) or "none"
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise EvalError(f"{where}: no 'prompt' string (fields: {found}); every metric needs the prompt")
        if "references" in row:
            refs = row["references"]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise EvalError(f"{where}: 'references' must be a non-empty list of strings")
        elif isinstance(row.get("answer"), str):
            refs = [row["answer"]]
        else:
            raise EvalError(f"{where}: no 'answer' string or 'references' list (fields: {found}); the metrics "
                            f"compare the completion with it")
        rows.append(TaskRow(row["prompt"], refs, where))
    if not rows:
        raise EvalError(f"--data {path}: no rows")
    return rows


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def reply_stops(template) -> list[str]:
    """Where a generated chat reply ends: the template's end-of-turn text (chatml: <|im_end|>), which is
    not part of the answer; nothing for plain prompts (template None)."""
    end = template.end_of_turn() if template is not None else ""
    return [end] if end else []


class AtlasGenerator:
    """Completions from an Atlas model (params, resolved Config, Tokenizer, chat template or None)."""

    def __init__(self, params: Any, cfg, tokenizer, template=None):
        import jax

        self.params = jax.device_put(params)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template
        self.stops = reply_stops(template)

    def encode(self, prompt: str) -> list[int]:
        if self.template is None:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.template.render([{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True))

    def _text(self, ids) -> str:
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode([int(t) for t in ids if t != eos])

    def greedy(self, prompt: str, max_new_tokens: int, stops: Sequence[str]) -> dict:
        """{completion, tokens, ttft_s, decode_tokens_per_s}: streamed, stopping at EOS or a stop string."""
        import jax

        from atlas_jax.sample import stream

        sample_cfg = dataclasses.replace(self.cfg.sample, temperature=0.0, max_new_tokens=max_new_tokens)
        start = time.perf_counter()
        steps = stream(self.params, [self.encode(prompt)], jax.random.key(0), sample_cfg, self.cfg.model,
                       eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        ids, first = [], None
        for tokens_B, active_B in steps:
            if not active_B[0]:
                break
            if first is None:
                first = time.perf_counter()
            ids.append(int(tokens_B[0]))
            if stops and cut_at_stop(self._text(ids), stops)[1]:
                break
        end = time.perf_counter()
        steps.close()
        text, _ = cut_at_stop(self._text(ids), stops)
        decode_s = end - (first or end)
        return {"completion": text, "tokens": len(ids), "ttft_s": (first or end) - start,
                "decode_tokens_per_s": (len(ids) - 1) / decode_s if len(ids) > 1 and decode_s > 0 else None}

    def samples(self, prompt: str, n: int, key, sample_cfg, stops: Sequence[str]) -> tuple[list[str], int, float]:
        """n sampled completions in one batch -> (texts, generated tokens, seconds)."""
        import jax

        from atlas_jax.sample import generate

        start = time.perf_counter()
        tokens_BxN, lengths_B = generate(self.params, [self.encode(prompt)] * n, key, sample_cfg, self.cfg.model,
                                         eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        tokens_BxN, lengths_B = jax.device_get((tokens_BxN, lengths_B))
        seconds = time.perf_counter() - start
        texts = [cut_at_stop(self._text(row[:m]), stops)[0] for row, m in zip(tokens_BxN, lengths_B)]
        return texts, int(np.sum(lengths_B)), seconds


def score_rows(metrics: Sequence[str], references: Sequence[Sequence[str]], greedy: Sequence[str] | None,
               samples: Sequence[Sequence[str]] | None, k: int) -> tuple[dict, list[dict]]:
    """The metrics over every row (module docstring) -> (corpus values, per-row values). Pure: tests
    call it on hand-written completions."""
    per_row: list[dict] = [{} for _ in references]
    answers_ref = [[M.final_answer(r) for r in refs] for refs in references]
    row_metrics = {"exact_match": M.exact_match, "f1": M.token_f1}
    out = {}
    for name in metrics:
        if name in row_metrics:
            vals = [row_metrics[name](M.final_answer(g), refs) for g, refs in zip(greedy, answers_ref)]
        elif name == "calculator":
            vals = [float(M.check_working(g) is True) for g in greedy]
        elif name == "rouge_l":
            vals = [M.rouge_l(g, refs) for g, refs in zip(greedy, references)]
        elif name == "pass_at_k":
            vals = []
            for s, refs in zip(samples, answers_ref):
                c = sum(int(M.exact_match(M.final_answer(x), refs)) for x in s)
                vals.append(M.pass_at_k(len(s), c, k))
        elif name == "self_consistency":
            vals = []
            for s, refs, row in zip(samples, answers_ref, per_row):
                vote = M.majority_vote([M.final_answer(x) for x in s])
                row["vote"] = vote
                vals.append(M.exact_match(vote, refs))
        elif name in ("bleu", "chrf"):
            out[name] = (M.bleu if name == "bleu" else M.chrf)(greedy, references)
            continue
        else:  # parse_metrics keeps this from happening
            raise EvalError(f"unknown metric {name}")
        for row, v in zip(per_row, vals):
            row[name] = v
        out[name] = float(np.mean(vals))
    return out, per_row


def evaluate_tasks(model: AtlasGenerator, rows: Sequence[TaskRow], metrics: Sequence[str], n: int, k: int,
                   max_new_tokens: int, sample_cfg, stops: Sequence[str] = (),
                   on_row: Callable[[], None] | None = None) -> dict:
    """Generate for every row, then score -> {metrics, latency, rows: [...]}."""
    import jax

    sampled = any(m in M.SAMPLED for m in metrics)
    stops = [*stops, *getattr(model, "stops", [])]
    sample_cfg = dataclasses.replace(sample_cfg, max_new_tokens=max_new_tokens)
    key = jax.random.key(sample_cfg.seed)
    greedy, samples, records = [], [], []
    sample_tokens, sample_seconds = 0, 0.0
    for i, row in enumerate(rows):
        rec: dict = {"where": row.where, "prompt": row.prompt, "references": row.references}
        g = model.greedy(row.prompt, max_new_tokens, stops)  # always: the latency comes from it
        greedy.append(g["completion"])
        rec.update(completion=g["completion"], answer=M.final_answer(g["completion"]), tokens=g["tokens"],
                   ttft_s=g["ttft_s"], decode_tokens_per_s=g["decode_tokens_per_s"])
        if sampled:
            texts, t, s = model.samples(row.prompt, n, jax.random.fold_in(key, i), sample_cfg, stops)
            samples.append(texts)
            sample_tokens, sample_seconds = sample_tokens + t, sample_seconds + s
            rec["samples"] = texts
        records.append(rec)
        if on_row is not None:
            on_row()
    values, per_row = score_rows(metrics, [r.references for r in rows], greedy, samples if sampled else None, k)
    for rec, extra in zip(records, per_row):
        rec.update(extra)
    ttfts = [r["ttft_s"] for r in records]
    rates = [r["decode_tokens_per_s"] for r in records if r.get("decode_tokens_per_s")]
    latency = {"ttft_s_median": statistics.median(ttfts), "ttft_s_mean": statistics.fmean(ttfts),
               "decode_tokens_per_s_median": statistics.median(rates) if rates else None}
    if sampled:
        latency["sampled_tokens_per_s"] = sample_tokens / sample_seconds if sample_seconds else None
    return {"metrics": values, "latency": latency, "n": n if sampled else None, "k": k if "pass_at_k" in metrics
            else None, "temperature": sample_cfg.temperature if sampled else 0.0, "rows": records}
