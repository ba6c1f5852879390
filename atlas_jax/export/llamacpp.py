"""llama.cpp (llama-cpp-python) on our GGUF files, each call in a child process.

    llamacpp_logits("model.gguf", ids)              # float32 [T, V], f32 KV cache
    llamacpp_logits("base.gguf", ids, lora_path="adapter.gguf")   # with a LoRA adapter applied
    llamacpp_generate("model.gguf", "ROMEO:", 32)   # ids; greedy by default
    llamacpp_quantize("f32.gguf", "q4_k_m.gguf", "q4_k_m")
    for kind, value in llamacpp_stream("model.gguf", "ROMEO:", 32, n_ctx=256): ...   # count, text..., count

`llamacpp_logits`, `llamacpp_tokenize`, `llamacpp_generate`, `llamacpp_perplexity` and
`llamacpp_quantize` each run one job of `_JOBS` in a fresh interpreter (`run_in_child`), so a
crash in native code is a LlamaCppError here, not a dead interpreter; `llamacpp_stream` does the
same for a job that yields as it goes (`stream_in_child`, over a pipe). A child's stderr (llama.cpp's
whole log, the models load verbose there) is kept from the terminal and only read for the reason
when it fails: llama.cpp's own line ("error loading model: ... not within the file bounds") ends
the one-line error.

The AMX workaround: llama.cpp 0.3.36 segfaults on CPUs with AMX on the first evaluation of
quantized tensors placed in the AMX/repack ("extra") buffer types. `open_llama` loads every model
with the model param `use_extra_bufts` off, so all tensors sit in plain CPU buffers, which avoids it.

llama.cpp 0.3.36 rounds every context up to a multiple of 256 tokens (GGML_PAD(n_ctx, 256) in
llama-context.cpp, whatever n_ctx is asked for), so a model with a shorter context_length logs
"n_ctx_seq (256) > n_ctx_train (64)" on each load; that line stays in the child's log, and the
callers keep to the file's own context_length (`_check_context`, llamacpp_generate.py).

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
from collections.abc import Iterator, Sequence
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
                    n_threads: int = LLAMA_THREADS, lora_path: str | Path | None = None
                    ) -> np.ndarray | list[np.ndarray]:
    """llama.cpp's float32 logits [T, V] for one token sequence (or a list of them), f32 KV cache;
    lora_path: a GGUF LoRA adapter applied to the model at load time (scale 1)."""
    single = len(tokens) > 0 and np.ndim(tokens[0]) == 0
    seqs = [list(map(int, tokens))] if single else [list(map(int, t)) for t in tokens]
    out = run_in_child("logits", path=str(gguf_path), seqs=seqs, n_threads=n_threads,
                       lora_path=None if lora_path is None else str(lora_path))
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


def llamacpp_stream(gguf_path: str | Path, prompt: str, max_tokens: int, n_ctx: int, temperature: float = 0.8,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, shrink_to_fit: bool = False,
                    n_threads: int = LLAMA_THREADS) -> Iterator[tuple[str, Any]]:
    """llama.cpp's own sampler (temperature, top-k, top-p; no min-p, no repeat penalty) on a text
    prompt, in a child process with an n_ctx-token context. Yields ("prompt_tokens", n) first (BOS
    included when the file's add_bos_token says so), then ("text", piece) as tokens are generated (up
    to max_tokens, or EOS), then ("generated_tokens", n).

    When the prompt and max_tokens do not fit n_ctx, the prompt's count is all it yields (the caller
    decides what to say); with shrink_to_fit, max_tokens shrinks to what fits, and only a prompt that
    fills the context yields nothing more."""
    return stream_in_child("stream", path=str(gguf_path), prompt=prompt, max_tokens=int(max_tokens), n_ctx=int(n_ctx),
                           temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=int(seed),
                           shrink_to_fit=bool(shrink_to_fit), n_threads=n_threads)


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
    _check_installed(job)
    with tempfile.TemporaryDirectory(prefix="atlas-llamacpp-") as d:
        req, res = Path(d, "request.pkl"), Path(d, "result.pkl")
        req.write_bytes(pickle.dumps((job, kwargs)))
        proc = subprocess.run(_child_command(req, res), env=_child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        return _child_result(job, what, proc.returncode, proc.stderr, res)


def stream_in_child(job: str, **kwargs) -> Iterator[Any]:
    """`run_in_child` for a job that yields: each value as the child sends it (pickled, over a pipe),
    then the same one-line LlamaCppError if the job failed or crashed. Closing the iterator early
    kills the child."""
    what = kwargs.get("path") or kwargs.get("src")
    _check_installed(job)
    with tempfile.TemporaryDirectory(prefix="atlas-llamacpp-") as d:
        req, res, err = Path(d, "request.pkl"), Path(d, "result.pkl"), Path(d, "stderr.txt")
        req.write_bytes(pickle.dumps((job, kwargs)))
        read_fd, write_fd = os.pipe()
        try:
            with open(err, "wb") as err_file:  # a file, not a pipe: a chatty child never blocks on it
                proc = subprocess.Popen([*_child_command(req, res), str(write_fd)], env=_child_env(),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
                                        pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            with os.fdopen(read_fd, "rb") as pipe:
                while True:
                    try:
                        value = pickle.load(pipe)
                    except (EOFError, pickle.UnpicklingError):  # done, or cut off by a crash (reported below)
                        break
                    yield value
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _child_result(job, what, proc.returncode, err.read_text(errors="replace"), res)


def _check_installed(job: str) -> None:
    if job in _JOBS and importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppError(f"'{job}' needs llama-cpp-python, which is not installed; "
                            f"pip install -e '.[llama-cpp]' (llama-cpp-python==0.3.36)")


def _child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _child_command(request: Path, result: Path) -> list[str]:
    code = "import sys; from atlas_jax.export.llamacpp import _child_main; _child_main(*sys.argv[1:])"
    return [sys.executable, "-c", code, str(request), str(result)]


def _child_result(job: str, what: str | None, returncode: int, stderr: str, result: Path) -> Any:
    """The job's value from its result file, or a one-line LlamaCppError ending in llama.cpp's reason."""
    lines = stderr.strip().splitlines()
    reasons = [ln.strip() for ln in lines if "GGML_ASSERT" in ln or "error" in ln.lower()]
    tail = reasons[-1] if reasons else " | ".join(ln.strip() for ln in lines[-3:])
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        raise LlamaCppError(f"llama.cpp crashed ({sig}) in '{job}' on {what}" + (f"; stderr: {tail}" if tail else ""))
    if not result.exists():
        raise LlamaCppError(f"llama.cpp '{job}' on {what} exited with code {returncode} and no result"
                            + (f"; stderr: {tail}" if tail else ""))
    ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise LlamaCppError(f"llama.cpp '{job}' on {what} failed: {value}" + (f"; {tail}" if reasons else ""))
    return value


def _child_main(request: str, result: str, stream_fd: str | None = None) -> None:
    job, kwargs = pickle.loads(Path(request).read_bytes())
    try:
        if job in _JOBS:
            fn = _JOBS[job]
        else:  # "module:function", for tests of the crash path
            module, _, attr = job.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        if stream_fd is None:
            out = (True, fn(**kwargs))
        else:
            with os.fdopen(int(stream_fd), "wb") as pipe:
                for value in fn(**kwargs):
                    pickle.dump(value, pipe)
                    pipe.flush()
            out = (True, None)
    except Exception as e:  # reported to the parent as one line
        out = (False, f"{type(e).__name__}: {' '.join(str(e).split())}")
    Path(result).write_bytes(pickle.dumps(out))


def open_llama(path: str, n_ctx: int, logits_all: bool = True, n_threads: int = LLAMA_THREADS, seed: int = 0,
               verbose: bool = False, lora_path: str | None = None):
    """llama_cpp.Llama with an f32 KV cache and `use_extra_bufts` off (see the module docstring).
    verbose: llama.cpp logs everything to stderr (the child jobs do, so a failed load can say why;
    with it off, llama-cpp-python hides the load's log, its error lines included).
    lora_path: a GGUF LoRA adapter llama.cpp applies to the model (scale 1).

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
                              n_threads=n_threads, n_threads_batch=n_threads, verbose=verbose, lora_path=lora_path)
    finally:
        lib.llama_model_default_params = defaults
    assert not llm.model_params.use_extra_bufts
    return llm


def _check_context(llm, n_tokens: int) -> None:
    """Positions past the training context: gpt2's position table ends there (llama.cpp aborts)."""
    n_ctx_train = llm._model.n_ctx_train()
    if n_tokens > n_ctx_train:
        raise ValueError(f"{n_tokens} tokens do not fit the model's context_length {n_ctx_train}")


def _job_logits(path: str, seqs: list[list[int]], n_threads: int, lora_path: str | None = None) -> list[np.ndarray]:
    llm = open_llama(path, n_ctx=max(len(s) for s in seqs), n_threads=n_threads, verbose=True, lora_path=lora_path)
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
    llm = open_llama(path, n_ctx=n_ctx, logits_all=greedy, n_threads=n_threads, seed=seed, verbose=True)
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


def _job_stream(path: str, prompt: str, max_tokens: int, n_ctx: int, temperature: float, top_k: int,
                top_p: float, seed: int, shrink_to_fit: bool, n_threads: int) -> Iterator[tuple[str, Any]]:
    import codecs

    llm = open_llama(path, n_ctx=n_ctx, logits_all=False, n_threads=n_threads, seed=seed, verbose=True)
    _check_context(llm, n_ctx)
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)  # as create_completion does
    yield "prompt_tokens", len(prompt_ids)
    if shrink_to_fit:
        max_tokens = min(max_tokens, n_ctx - len(prompt_ids))
    if max_tokens < 1 or len(prompt_ids) + max_tokens > n_ctx:
        return  # the caller says so; past the context gpt2's position table ends (llama.cpp aborts)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a character split across tokens
    out: list[int] = []
    for tok in llm.generate(prompt_ids, temp=temperature, top_k=top_k, top_p=top_p, min_p=0.0, repeat_penalty=1.0,
                            reset=True):
        if tok == llm.token_eos():
            break
        piece = text.decode(llm.detokenize([tok], prev_tokens=prompt_ids + out))
        out.append(int(tok))
        if piece:
            yield "text", piece
        if len(out) == max_tokens:
            break
    if tail := text.decode(b"", final=True):
        yield "text", tail
    yield "generated_tokens", len(out)


def _job_perplexity(path: str, tokens: np.ndarray, window: int, max_windows: int | None,
                    n_threads: int) -> dict[str, float]:
    n = len(tokens) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens hold no {window}-token window")
    llm = open_llama(path, n_ctx=window, n_threads=n_threads, verbose=True)
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


_JOBS = {"logits": _job_logits, "tokenize": _job_tokenize, "generate": _job_generate, "stream": _job_stream,
         "perplexity": _job_perplexity, "quantize": _job_quantize}
