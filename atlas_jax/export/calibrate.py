"""Calibration for GPTQ q4_0: the input statistics of every Dense layer on a run's own train text.

    calibration = run_calibration(params, cfg, data_dir)   # {"layers_0/attn/wq": H [in, in], ...}
    export_gguf(params, cfg.model, tokenizer, "q4_0.gguf", "q4_0", calibration=calibration)
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from atlas_jax.errors import DataError
from atlas_jax.export.gguf import ExportError


def run_calibration(params: Mapping, cfg, data_dir: str | Path, n_windows: int = 32) -> dict[str, np.ndarray]:
    """`quantize.input_hessians` over n_windows data.seq_len-token windows spread evenly over the
    run's train split (never the validation split the quality is measured on)."""
    from atlas_jax.data.prepare import load_split
    from atlas_jax.export.quantize import input_hessians

    try:
        train = np.asarray(load_split(data_dir, "train"))
    except (DataError, OSError) as e:
        raise ExportError(f"{data_dir}: no train split to calibrate q4_0 on ({' '.join(str(e).split())[:200]}); "
                          f"pass --no-calibrate") from None
    window = cfg.data.seq_len
    if len(train) < window + 1:
        raise ExportError(f"{data_dir}: the train split ({len(train)} tokens) holds no {window}-token window "
                          f"to calibrate on; pass --no-calibrate")
    starts = np.linspace(0, len(train) - window, num=min(n_windows, len(train) // window)).astype(np.int64)
    return input_hessians(params, cfg.model, np.stack([train[s:s + window] for s in starts]))
