"""How close llama.cpp runs our GGUF files to Atlas: logits, perplexity, greedy text, per --type.

    compare_run_with_llamacpp("runs/shakespeare", "out/")   # {"f32": {"max_abs": ..., "top1": ...}, ...}

Atlas' float32 forward (`atlas_logits`) is the reference; each type is exported (gguf.py) and run
in llama.cpp (llamacpp.py). `scripts/bench.py quality` and docs/benchmarks.md are made with it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.config import ModelConfig
from atlas_jax.export.calibrate import run_calibration
from atlas_jax.export.gguf import ExportError, export_gguf
from atlas_jax.export.llamacpp import llamacpp_generate, llamacpp_logits


def atlas_logits(params: Mapping, cfg: ModelConfig, tokens_NxT: np.ndarray) -> np.ndarray:
    """Atlas' float32 logits [N, T, V] for full sequences (the reference llama.cpp is held to)."""
    import jax
    import jax.numpy as jnp

    from atlas_jax.model import Transformer

    key = repr(cfg)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    return np.asarray(_FORWARDS[key](params, jnp.asarray(tokens_NxT, jnp.int32)))


_FORWARDS: dict[str, Any] = {}  # jitted forward per model config


def _nll(logits_NxTxV: np.ndarray, tokens_NxT: np.ndarray) -> tuple[float, int]:
    """Summed NLL (nats) of tokens[:, 1:] under logits[:, :-1], and how many tokens that is."""
    x = logits_NxTxV[:, :-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    target = np.take_along_axis(x, tokens_NxT[:, 1:, None].astype(np.int64), -1)[..., 0]
    return float(np.sum(logz - target)), int(target.size)


def compare_with_llamacpp(params: Mapping, cfg: ModelConfig, tokenizer_path: str | Path, windows_NxT: np.ndarray,
                          out_dir: str | Path, ftypes: Sequence[str] = ("f32", "q8_0", "q4_0"),
                          greedy_prompt: Sequence[int] | None = None, greedy_tokens: int = 32,
                          calibration: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Export `params` as each type in `ftypes` and hold llama.cpp to Atlas on the token windows.

    Per type: bytes (file size), max_abs (largest |logit difference|), top1 (fraction of positions
    whose argmax agrees), ppl_atlas / ppl_llamacpp (perplexity of windows[:, 1:]) and, with
    greedy_prompt, greedy_match (llama.cpp's greedy continuation equals Atlas' sample.generate at
    temperature 0). The files are left in out_dir as <ftype>.gguf. With `calibration` (see
    export_gguf) the type "q4_0" is GPTQ-quantized and "q4_0-rtn" is the plain round-to-nearest one.
    """
    import jax

    from atlas_jax.config import SampleConfig
    from atlas_jax.sample import generate

    windows_NxT = np.asarray(windows_NxT, dtype=np.int32)
    ref = atlas_logits(params, cfg, windows_NxT)
    nll_ref, count = _nll(ref, windows_NxT)
    atlas_greedy = None
    if greedy_prompt is not None:
        toks, lengths = generate(params, [list(greedy_prompt)], jax.random.key(0),
                                 SampleConfig(temperature=0.0, max_new_tokens=greedy_tokens), cfg)
        atlas_greedy = np.asarray(toks)[0, :int(lengths[0])].tolist()
    report = {}
    for ftype in ftypes:
        path = export_gguf(params, cfg, tokenizer_path, Path(out_dir) / f"{ftype}.gguf", ftype.removesuffix("-rtn"),
                           calibration=None if ftype.endswith("-rtn") else calibration)
        got = np.stack(llamacpp_logits(path, [w.tolist() for w in windows_NxT]))
        nll, _ = _nll(got, windows_NxT)
        row = {"bytes": path.stat().st_size, "max_abs": float(np.abs(got - ref).max()),
               "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
               "ppl_atlas": float(np.exp(nll_ref / count)), "ppl_llamacpp": float(np.exp(nll / count))}
        if atlas_greedy is not None:
            ours = llamacpp_generate(path, list(greedy_prompt), greedy_tokens, greedy=True)
            row["greedy_match"] = ours == atlas_greedy
        report[ftype] = row
    return report



def compare_run_with_llamacpp(run_dir: str | Path, out_dir: str | Path,
                              ftypes: Sequence[str] = ("f32", "f16", "q8_0", "q4_0", "q4_0-rtn", "q4_k_m",
                                                       "q5_k_m", "q6_k"),
                              window: int | None = None, n_windows: int = 16, greedy_tokens: int = 32
                              ) -> dict[str, dict]:
    """`compare_with_llamacpp` for a trained run: windows from the head of its validation split
    (<data_dir>/val.bin; `window` defaults to data.seq_len), greedy continuation of the first window's
    first 16 tokens; q4_0 calibrated on the train split (`run_calibration`)."""
    from atlas_jax.checkpoint import find_checkpoint
    from atlas_jax.init_from import load_model
    from atlas_jax.data.prepare import load_split, run_data_dir

    params, cfg, tokenizer_path = load_model(run_dir)
    data_dir = run_data_dir(cfg.data, find_checkpoint(run_dir)[0])
    calibration = run_calibration(params, cfg, data_dir) if "q4_0" in ftypes else None
    val = np.asarray(load_split(data_dir, "val"))
    window = window or cfg.data.seq_len
    n = min(n_windows, len(val) // window)
    if n == 0:
        raise ExportError(f"{data_dir}: the val split ({len(val)} tokens) holds no {window}-token window")
    windows = val[:n * window].reshape(n, window)
    return compare_with_llamacpp(params, cfg.model, tokenizer_path, windows, out_dir, ftypes,
                                 greedy_prompt=windows[0, :16].tolist(), greedy_tokens=greedy_tokens,
                                 calibration=calibration)
