"""The llama.cpp side of `perplexity`'s GGUF scoring: jobs run in a child process by
`atlas_jax.export.llamacpp.run_in_child` / `stream_in_child` ("atlas_jax.eval.gguf_job:score"), so a
native crash is a one-line error in the parent. No JAX here: the child stays light."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def info(path: str) -> dict:
    """The file's context length, vocabulary size and start tokens (a vocab-only load)."""
    from llama_cpp import _internals
    from llama_cpp import llama_cpp as lib

    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=path, params=params, verbose=True)
    try:
        meta = model.metadata()  # a vocab-only load leaves n_ctx_train() at 0: read the file's key
        arch = meta.get("general.architecture", "")
        n_ctx = int(meta.get(f"{arch}.context_length", 0) or model.n_ctx_train())
        return {"n_ctx_train": n_ctx, "n_vocab": int(model.n_vocab()),
                "bos": int(model.token_bos()), "eos": int(model.token_eos()), "add_bos": bool(model.add_bos_token())}
    finally:
        model.close()


def score(path: str, seqs: list[np.ndarray], windows: list[tuple[int, int, int, int]], n_ctx: int,
          n_threads: int, greedy: bool = False) -> Iterator[np.ndarray]:
    """Per window (doc, begin, length, score_from): the NLLs (nats, float64) of positions
    score_from..length-1, each window evaluated from an empty cache; with greedy, (NLLs, whether each
    label is the argmax)."""
    from atlas_jax.export.llamacpp import open_llama

    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads, verbose=True)
    if n_ctx > llm._model.n_ctx_train():
        raise ValueError(f"{n_ctx}-token windows do not fit the model's context_length {llm._model.n_ctx_train()}")
    for doc, begin, length, score_from in windows:
        seq = np.asarray(seqs[doc])
        llm.reset()
        llm.eval(seq[begin:begin + length].tolist())
        logits = np.asarray(llm.scores[score_from:length], np.float64)
        labels = seq[begin + score_from + 1:begin + length + 1]
        m = logits.max(-1)
        logz = np.log(np.exp(logits - m[:, None]).sum(-1)) + m
        nll = logz - logits[np.arange(len(labels)), labels]
        yield (nll, logits.argmax(-1) == labels) if greedy else nll


def generate(path: str, prompts: list[list[int]], settings: list[tuple[int, float, int, float]], n_ctx: int,
             n_threads: int, seed: int) -> Iterator[str]:
    """Per prompt (ids) and its (max_new_tokens, temperature, top_k, top_p): the text generated up to
    EOS (excluded) or max_new_tokens, from an empty cache; temperature 0 is the argmax of llama.cpp's
    logits, else llama.cpp's sampler (no min-p, no repeat penalty)."""
    from atlas_jax.export.llamacpp import open_llama

    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=True)
    eos = llm.token_eos()
    for prompt, (n_new, temperature, top_k, top_p) in zip(prompts, settings):
        llm.reset()
        out: list[int] = []
        if temperature == 0:
            llm.eval(list(prompt))
            while len(out) < n_new:
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if nxt == eos:
                    break
                out.append(nxt)
                if len(out) < n_new:
                    llm.eval([nxt])
        else:
            for tok in llm.generate(list(prompt), temp=temperature, top_k=top_k, top_p=top_p, min_p=0.0,
                                    repeat_penalty=1.0, reset=True):
                if tok == eos:
                    break
                out.append(int(tok))
                if len(out) == n_new:
                    break
        yield llm.detokenize(out, prev_tokens=list(prompt)).decode("utf-8", errors="replace")
