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
          n_threads: int) -> Iterator[np.ndarray]:
    """Per window (doc, begin, length, score_from): the NLLs (nats, float64) of positions
    score_from..length-1, each window evaluated from an empty cache."""
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
        yield logz - logits[np.arange(len(labels)), labels]
