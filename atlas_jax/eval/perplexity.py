"""Strided perplexity and bits per byte of an Atlas model or of any GGUF file (through llama.cpp).

    docs = text_documents("tinyshakespeare")                       # or val_documents(run_dir)
    seqs = atlas_sequences(tokenizer, docs)                        # [EOS] + ids per document
    plan = plan_windows([len(s) for s in seqs], window=256, stride=128)
    totals = Totals(window=256)
    for scored in score_atlas(params, cfg.model, seqs, plan):      # or score_gguf(path, seqs, plan)
        totals.add(scored)
    totals.summary(n_bytes=sum(len(d.encode()) for d in docs))     # nats/token, perplexity, bits/byte

The procedure (the standard strided one): each document is its own token sequence, preceded by a
start token (Atlas: EOS, which is what precedes a document in the training streams; a GGUF file: BOS
when its add_bos_token says so, else EOS), so every token of the document is scored and its bytes are
exactly the document's UTF-8 bytes, whatever the tokenizer: that makes a 2k-vocab Atlas model and an
open model with a 128k vocabulary comparable on the same text. Windows are `window` input tokens
(fewer only for a document shorter than that); the first window of a document scores every position,
each later one only its last `stride` targets, so every token is scored exactly once with at least
window - stride tokens of context (the last window is moved back to end at the document's end, which
only gives it more context). stride == window: non-overlapping windows, each scored whole.

Bits per byte = summed NLL (nats) / ln 2 / UTF-8 bytes of the documents.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.errors import AtlasError


class EvalError(AtlasError):
    pass


@dataclasses.dataclass(frozen=True)
class Window:
    doc: int  # which sequence
    begin: int  # the window's inputs are seq[begin:begin + length]
    length: int
    score_from: int  # positions score_from..length-1 are scored; position j predicts seq[begin + j + 1]


@dataclasses.dataclass
class Scored:
    """The NLLs of one window's scored positions (nats, float64) and their context lengths."""
    window: Window
    nll: np.ndarray

    @property
    def context(self) -> np.ndarray:
        """Tokens of context each scored target had (the start token counts as one)."""
        return np.arange(self.window.score_from, self.window.length) + 1


def check_window(window: int, stride: int, limit: int | None, what: str) -> None:
    if window < 1:
        raise EvalError(f"--window {window}: must be at least 1 token")
    if limit is not None and window > limit:
        raise EvalError(f"--window {window}: longer than {what}'s context of {limit} tokens; use --window {limit} or less")
    if not 1 <= stride <= window:
        raise EvalError(f"--stride {stride}: must be between 1 and the window ({window}); stride = window scores "
                        f"non-overlapping windows, a smaller stride gives each token more context")


def plan_windows(lengths: Sequence[int], window: int, stride: int) -> list[Window]:
    """The windows that score every target (seq[1:]) of each sequence exactly once (module docstring)."""
    plan = []
    for doc, n in enumerate(lengths):
        targets = n - 1
        if targets < 1:
            continue
        length = min(window, targets)
        plan.append(Window(doc, 0, length, 0))
        done = length  # targets seq[1..done] are scored
        while done < targets:
            end = min(done + stride, targets)
            begin = end - length
            plan.append(Window(doc, begin, length, done - begin))
            done = end
    return plan


# --------------------------------------------------------------------------- text and tokens


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text (byte {e.start}); give a UTF-8 file") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot read it ({e.strerror})") from None


def text_documents(spec: str, text_field: str = "text") -> list[str]:
    """--text: a file, a corpus name, a directory or a glob (as data.sources) -> its documents: a .txt
    file is one document, a .jsonl file one per row (its `text_field`)."""
    from atlas_jax.data.corpora import resolve_sources

    docs = []
    for path in resolve_sources([spec], key="--text"):
        text = _read_utf8(path)
        if path.suffix != ".jsonl":
            docs.append(text)
            continue
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise EvalError(f"{path}:{lineno}: no string '{text_field}' field; each row needs the text to score")
            docs.append(row[text_field])
    docs = [d for d in docs if d]
    if not docs:
        raise EvalError(f"--text {spec}: no text to score")
    return docs


def val_documents(run: str | Path) -> list[str]:
    """A run's val split as text: its tokens cut at EOS into documents, each decoded by the run's tokenizer."""
    from atlas_jax import checkpoint as ckpt
    from atlas_jax.data.prepare import load_split, run_data_dir
    from atlas_jax.tokenizer import Tokenizer

    run_dir, step_dir = ckpt.find_checkpoint(run)
    cfg = ckpt.checkpoint_config(step_dir)
    tokens = np.asarray(load_split(run_data_dir(cfg.data, run_dir), "val"))
    tok = Tokenizer.load(ckpt.tokenizer_path(run_dir, cfg))
    cuts = np.flatnonzero(tokens == tok.eos_id) if tok.eos_id is not None and tok.eos_id >= 0 else np.zeros(0, int)
    pieces = np.split(tokens, cuts)  # each piece after the first starts with the EOS that ended the last
    docs = [tok.decode([int(t) for t in p if t != tok.eos_id]) for p in pieces]
    docs = [d for d in docs if d]
    if not docs:
        raise EvalError(f"--val {run}: the run's val split is empty (data.val_fraction=0?)")
    return docs


def atlas_sequences(tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """[EOS] + the tokenizer's ids, per document (int32)."""
    start = [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    if not start:
        raise EvalError(f"{tokenizer.path}: the tokenizer has no EOS to start documents with, so their first "
                        f"tokens could not be scored")
    return [np.asarray(start + tokenizer.encode(d), np.int32) for d in docs]


# --------------------------------------------------------------------------- scoring


def score_atlas(params: Any, model_cfg, seqs: Sequence[np.ndarray], plan: Sequence[Window],
                batch_size: int = 8) -> Iterator[list[Scored]]:
    """Atlas' NLLs, `batch_size` windows per jitted forward (every batch padded to the longest window
    and to batch_size rows, so one shape compiles); yields one list of Scored per batch."""
    import jax

    if not plan:
        return
    width = max(w.length for w in plan)
    scores_fn = token_scores_fn(model_cfg)
    params = jax.device_put(params)
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        inputs = np.zeros((batch_size, width), np.int32)
        labels = np.zeros((batch_size, width), np.int32)
        for r, w in enumerate(chunk):
            seq = seqs[w.doc]
            inputs[r, :w.length] = seq[w.begin:w.begin + w.length]
            labels[r, :w.length] = seq[w.begin + 1:w.begin + w.length + 1]
        nll = np.asarray(scores_fn(params, inputs, labels)[0], np.float64)
        yield [Scored(w, nll[r, w.score_from:w.length]) for r, w in enumerate(chunk)]


def token_scores_fn(model_cfg):
    """The jitted (params, inputs_BxT, labels_BxT) -> (nll_BxT, greedy_BxT) of a model config (made
    once per config): each position's NLL of its label (float32 log-softmax) and whether the label is
    the argmax there. Shared by score_atlas and the lm-eval adapter (harness)."""
    import jax
    import jax.numpy as jnp

    from atlas_jax.model import Transformer

    key = repr(model_cfg)
    if key not in _SCORE_FNS:
        model = Transformer(model_cfg)

        @jax.jit
        def scores_fn(p, inputs_BxT, labels_BxT):
            logits_BxTxV = model.apply({"params": p}, inputs_BxT).astype(jnp.float32)
            logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
            nll_BxT = logz_BxT - jnp.take_along_axis(logits_BxTxV, labels_BxT[..., None], axis=-1)[..., 0]
            return nll_BxT, jnp.argmax(logits_BxTxV, axis=-1) == labels_BxT

        _SCORE_FNS[key] = scores_fn
    return _SCORE_FNS[key]


_SCORE_FNS: dict[str, Any] = {}  # token_scores_fn's jitted function per model config


def gguf_info(path: str | Path) -> dict:
    """{n_ctx_train, n_vocab, bos, eos, add_bos} of a GGUF file, read by llama.cpp (vocab only)."""
    from atlas_jax.export.llamacpp import LlamaCppError, run_in_child

    _check_llama_cpp()
    try:
        return run_in_child("atlas_jax.eval.gguf_job:info", path=str(path))
    except LlamaCppError as e:
        why = str(e).split(" failed: ", 1)[-1]
        raise EvalError(f"--gguf {path}: llama.cpp cannot load it ({why})") from None


def gguf_sequences(path: str | Path, docs: Sequence[str], info: dict) -> list[np.ndarray]:
    """The GGUF's own tokenizer (llama.cpp): [BOS if add_bos_token else EOS] + ids, per document."""
    from atlas_jax.export.llamacpp import llamacpp_tokenize

    _check_llama_cpp()
    start = info["bos"] if info["add_bos"] and info["bos"] >= 0 else info["eos"]
    if start < 0:
        raise EvalError(f"{path}: the file's tokenizer has neither BOS nor EOS to start documents with")
    return [np.asarray([start] + ids, np.int32) for ids in llamacpp_tokenize(path, docs)]


def score_gguf(path: str | Path, seqs: Sequence[np.ndarray], plan: Sequence[Window],
               n_threads: int = 2) -> Iterator[list[Scored]]:
    """llama.cpp's NLLs (float32 logits, f32 KV cache, each window from an empty cache), in a child
    process that sends each window's NLLs as it goes; one list of one Scored per window."""
    from atlas_jax.export.llamacpp import stream_in_child

    _check_llama_cpp()
    if not plan:
        return
    used = sorted({w.doc for w in plan})
    index = {d: i for i, d in enumerate(used)}
    windows = [(index[w.doc], w.begin, w.length, w.score_from) for w in plan]
    values = stream_in_child("atlas_jax.eval.gguf_job:score", path=str(path), seqs=[seqs[d] for d in used],
                             windows=windows, n_ctx=max(w.length for w in plan), n_threads=int(n_threads))
    for w, nll in zip(plan, values):
        yield [Scored(w, np.asarray(nll, np.float64))]


def _check_llama_cpp() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise EvalError("--gguf needs llama-cpp-python, which is not installed; pip install -e '.[llama-cpp]'")


# --------------------------------------------------------------------------- totals


class Totals:
    """Sums over scored windows: NLL, tokens, and both per context length (1..window) for the curve."""

    def __init__(self, window: int):
        self.nll = 0.0
        self.tokens = 0
        self.windows = 0
        self.nll_by_context = np.zeros(window + 1)
        self.count_by_context = np.zeros(window + 1, np.int64)

    def add(self, scored: Sequence[Scored]) -> None:
        for s in scored:
            self.nll += float(s.nll.sum())
            self.tokens += s.nll.size
            self.windows += 1
            np.add.at(self.nll_by_context, s.context, s.nll)
            np.add.at(self.count_by_context, s.context, 1)

    def summary(self, n_bytes: int) -> dict:
        nats = self.nll / max(self.tokens, 1)
        return {"tokens": self.tokens, "bytes": int(n_bytes), "windows": self.windows, "nll_nats": self.nll,
                "nats_per_token": nats, "perplexity": math.exp(nats),
                "bits_per_byte": self.nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
                "bytes_per_token": n_bytes / max(self.tokens, 1)}

    def by_context(self, buckets: int = 16) -> list[dict]:
        """Mean NLL of the targets by their context length, in up to `buckets` log-spaced ranges, as
        nats/token and as bits per byte at the text's overall bytes per token."""
        n = len(self.count_by_context) - 1
        edges = np.unique(np.round(np.geomspace(1, n + 1, buckets + 1)).astype(int))
        out = []
        for lo, hi in itertools.pairwise(edges):
            c = int(self.count_by_context[lo:hi].sum())
            if c:
                out.append({"context_from": int(lo), "context_to": int(hi - 1), "tokens": c,
                            "nats_per_token": float(self.nll_by_context[lo:hi].sum() / c)})
        return out
