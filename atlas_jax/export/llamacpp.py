"""llama.cpp (llama-cpp-python) on our GGUF files, each call in a child process.

    llamacpp_logits("model.gguf", ids)              # float32 [T, V], f32 KV cache
    llamacpp_generate("model.gguf", "ROMEO:", 32)   # ids; greedy by default
    llamacpp_quantize("f32.gguf", "q4_k_m.gguf", "q4_k_m")

`llamacpp_logits`, `llamacpp_tokenize`, `llamacpp_generate`, `llamacpp_perplexity` and
`llamacpp_quantize` each run one job of `_JOBS` in a fresh interpreter (`run_in_child`), so a
crash in native code is a LlamaCppError here, not a dead interpreter.

The AMX workaround: llama.cpp 0.3.36 segfaults on CPUs with AMX on the first evaluation of
quantized tensors placed in the AMX/repack ("extra") buffer types. `open_llama` loads every model
with the model param `use_extra_bufts` off, so all tensors sit in plain CPU buffers, which avoids it.

This module imports nothing from the rest of atlas_jax.export (gguf.py imports it for the K-quants),
and no JAX: the child processes stay light.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import LlamaFileType

from atlas_jax.errors import AtlasError


class LlamaCppError(AtlasError):
    pass


GGML_TYPE_F32 = 0  # llama.cpp KV-cache type for parity checks (the default f16 cache costs ~1e-3)
LLAMA_THREADS = 2
# --type -> llama.cpp's quantizer target (applied to an f32 export; gguf.py offers these as --type).
LLAMACPP_FTYPES: dict[str, LlamaFileType] = {
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}


def llamacpp_logits(gguf_path: str | Path, tokens: Sequence[int] | Sequence[Sequence[int]],
                    n_threads: int = LLAMA_THREADS) -> np.ndarray | list[np.ndarray]:
    """llama.cpp's float32 logits [T, V] for one token sequence (or a list of them), f32 KV cache."""
    single = len(tokens) > 0 and np.ndim(tokens[0]) == 0
    seqs = [list(map(int, tokens))] if single else [list(map(int, t)) for t in tokens]
    out = run_in_child("logits", path=str(gguf_path), seqs=seqs, n_threads=n_threads)
    return out[0] if single else out


def llamacpp_tokenize(gguf_path: str | Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's ids for each text (no BOS, special tokens not parsed)."""
    return run_in_child("tokenize", path=str(gguf_path), texts=list(texts))


def llamacpp_generate(gguf_path: str | Path, prompt: str | Sequence[int], n_tokens: int, greedy: bool = True,
                      temperature: float = 0.8, seed: int = 0, n_threads: int = LLAMA_THREADS) -> list[int]:
    """The ids llama.cpp generates after `prompt` (ids as given, or text tokenized by llama.cpp,
    which prepends BOS when the file's add_bos_token says so).

    greedy: argmax of llama.cpp's logits at every step (compare with Atlas greedy decoding);
    else llama.cpp's own sampler at `temperature`.
    """
    return run_in_child("generate", path=str(gguf_path), prompt=prompt if isinstance(prompt, str) else
                      [int(t) for t in prompt], n_tokens=int(n_tokens), greedy=greedy,
                      temperature=float(temperature), seed=int(seed), n_threads=n_threads)


def llamacpp_perplexity(gguf_path: str | Path, tokens: Sequence[int], window: int, max_windows: int | None = None,
                        n_threads: int = LLAMA_THREADS) -> dict[str, float]:
    """Perplexity over non-overlapping `window`-token windows of `tokens`, each evaluated from an empty
    cache and scored on its last window-1 tokens: {'ppl', 'nll' (mean, nats), 'tokens'}."""
    return run_in_child("perplexity", path=str(gguf_path), tokens=np.asarray(tokens, np.int32),
                      window=int(window), max_windows=max_windows, n_threads=n_threads)


def llamacpp_quantize(src: str | Path, dst: str | Path, ftype: str, n_threads: int = LLAMA_THREADS) -> Path:
    """Re-quantize an f32/f16 GGUF with llama.cpp's quantizer (llama_model_quantize) to q4_k_m/q5_k_m/q6_k."""
    if ftype not in LLAMACPP_FTYPES:
        raise LlamaCppError(f"llama.cpp quantization '{ftype}' is not one of {', '.join(LLAMACPP_FTYPES)}")
    run_in_child("quantize", src=str(src), dst=str(dst), ftype=int(LLAMACPP_FTYPES[ftype]), n_threads=n_threads)
    return Path(dst)


def run_in_child(job: str, **kwargs) -> Any:
    """Run one of the llama.cpp jobs ("logits", "tokenize", "generate", "perplexity", "quantize")
    with `kwargs`, or any picklable-in, picklable-out "module:function", in a fresh interpreter.

    A native crash becomes a LlamaCppError naming the signal instead of taking the caller down; an
    exception in the job becomes a one-line LlamaCppError. kwargs "path" or "src" name the file in
    messages."""
    what = kwargs.get("path") or kwargs.get("src")
    if job in _JOBS and importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppError(f"'{job}' needs llama-cpp-python, which is not installed; "
                            f"pip install -e '.[llama-cpp]' (llama-cpp-python==0.3.36)")
    with tempfile.TemporaryDirectory(prefix="atlas-llamacpp-") as d:
        req, res = Path(d, "request.pkl"), Path(d, "result.pkl")
        req.write_bytes(pickle.dumps((job, kwargs)))
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        code = "import sys; from atlas_jax.export.llamacpp import _child_main; _child_main(sys.argv[1], sys.argv[2])"
        proc = subprocess.run([sys.executable, "-c", code, str(req), str(res)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        lines = proc.stderr.strip().splitlines()
        asserts = [ln.strip() for ln in lines if "GGML_ASSERT" in ln or "error" in ln.lower()]
        tail = asserts[-1] if asserts else " | ".join(lines[-3:])
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            raise LlamaCppError(f"llama.cpp crashed ({sig}) in '{job}' on {what}"
                                + (f"; stderr: {tail}" if tail else ""))
        if not res.exists():
            raise LlamaCppError(f"llama.cpp '{job}' on {what} exited with code {proc.returncode} and no result"
                                + (f"; stderr: {tail}" if tail else ""))
        ok, value = pickle.loads(res.read_bytes())
    if not ok:
        raise LlamaCppError(f"llama.cpp '{job}' on {what} failed: {value}")
    return value


def _child_main(request: str, result: str) -> None:
    job, kwargs = pickle.loads(Path(request).read_bytes())
    try:
        if job in _JOBS:
            fn = _JOBS[job]
        else:  # "module:function", for tests of the crash path
            module, _, attr = job.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        out = (True, fn(**kwargs))
    except Exception as e:  # reported to the parent as one line
        out = (False, f"{type(e).__name__}: {' '.join(str(e).split())}")
    Path(result).write_bytes(pickle.dumps(out))


def open_llama(path: str, n_ctx: int, logits_all: bool = True, n_threads: int = LLAMA_THREADS, seed: int = 0):
    """llama_cpp.Llama with an f32 KV cache and `use_extra_bufts` off (see the module docstring).

    The high-level Llama builds its model params from llama_model_default_params() inside
    __init__ and exposes no switch for use_extra_bufts, so that function is swapped for the
    duration of the constructor (call this in a single-threaded process, as the child jobs do).
    """
    import llama_cpp
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_bufts
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=seed,
                              n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    finally:
        lib.llama_model_default_params = defaults
    assert not llm.model_params.use_extra_bufts
    return llm


def _check_context(llm, n_tokens: int) -> None:
    """Positions past the training context: gpt2's position table ends there (llama.cpp aborts)."""
    n_ctx_train = llm._model.n_ctx_train()
    if n_tokens > n_ctx_train:
        raise ValueError(f"{n_tokens} tokens do not fit the model's context_length {n_ctx_train}")


def _job_logits(path: str, seqs: list[list[int]], n_threads: int) -> list[np.ndarray]:
    llm = open_llama(path, n_ctx=max(len(s) for s in seqs), n_threads=n_threads)
    _check_context(llm, max(len(s) for s in seqs))
    out = []
    for seq in seqs:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[:len(seq)], dtype=np.float32))
    return out


def _tokenize(path: str, texts: list[str], add_special: bool) -> list[list[int]]:
    """llama_tokenize on a vocab-only load (special tokens in the text are not parsed)."""
    import ctypes

    from llama_cpp import _internals
    from llama_cpp import llama_cpp as lib

    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    try:
        out = []
        for text in texts:
            data = text.encode("utf-8")
            n = len(data) + 2
            while True:
                buf = (lib.llama_token * n)()
                got = lib.llama_tokenize(model.vocab, data, len(data), buf, n, add_special, False)
                if got >= 0:
                    break
                n = -got
            out.append([int(t) for t in ctypes.cast(buf, ctypes.POINTER(lib.llama_token))[:got]])
        return out
    finally:
        model.close()


def _job_tokenize(path: str, texts: list[str]) -> list[list[int]]:
    return _tokenize(path, texts, add_special=False)


def _job_generate(path: str, prompt, n_tokens: int, greedy: bool, temperature: float, seed: int,
                  n_threads: int) -> list[int]:
    if isinstance(prompt, str):
        prompt = _tokenize(path, [prompt], add_special=True)[0]  # BOS per the file's add_bos_token
    n_ctx = len(prompt) + n_tokens
    llm = open_llama(path, n_ctx=n_ctx, logits_all=greedy, n_threads=n_threads, seed=seed)
    _check_context(llm, n_ctx)
    if not greedy:
        out = []
        for tok in llm.generate(prompt, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, reset=True):
            out.append(int(tok))
            if len(out) == n_tokens or tok == llm.token_eos():
                break
        return out
    out, seq = [], list(prompt)
    llm.eval(seq)
    for _ in range(n_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if len(out) < n_tokens:
            llm.eval([nxt])
    return out


def _job_perplexity(path: str, tokens: np.ndarray, window: int, max_windows: int | None,
                    n_threads: int) -> dict[str, float]:
    n = len(tokens) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens hold no {window}-token window")
    llm = open_llama(path, n_ctx=window, n_threads=n_threads)
    _check_context(llm, window)
    total, count = 0.0, 0
    for w in range(n):
        seq = tokens[w * window:(w + 1) * window].tolist()
        llm.reset()
        llm.eval(seq)
        logits = np.asarray(llm.scores[:window - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float(np.sum(logz - logits[np.arange(window - 1), seq[1:]]))
        count += window - 1
    return {"ppl": float(np.exp(total / count)), "nll": total / count, "tokens": count}


def _job_quantize(src: str, dst: str, ftype: int, n_threads: int) -> None:
    from llama_cpp import llama_cpp as lib

    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    if lib.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) failed")


_JOBS = {"logits": _job_logits, "tokenize": _job_tokenize, "generate": _job_generate,
         "perplexity": _job_perplexity, "quantize": _job_quantize}
