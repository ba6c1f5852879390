"""Training batches of random windows, indexed by step; fixed validation batches.

Global batch k holds `global_batch_size` windows of seq_len+1 tokens whose start offsets are drawn
from np.random.default_rng([seed, k]), so batch k is a pure function of (data, seed, k): resuming
needs only k (the grain iterator state), and process p of P yields rows [p*B/P, (p+1)*B/P) of the
same global batch a single process would see. Windows are gathered from the memmap in one numpy
fancy index per batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import numpy as np

from atlas_jax.data.prepare import load_split, read_meta
from atlas_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]  # {"inputs": int32[B, T], "targets": int32[B, T]}


def _windows(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int) -> Batch:
    idx_BxT1 = starts_B[:, None] + np.arange(seq_len + 1)
    w_BxT1 = tokens[idx_BxT1].astype(np.int32)
    return {"inputs": np.ascontiguousarray(w_BxT1[:, :-1]), "targets": np.ascontiguousarray(w_BxT1[:, 1:])}


class _StepBatch:
    """step -> this process's rows of global batch `step` (picklable: reopens the memmap lazily)."""

    def __init__(self, data_dir: Path, seq_len: int, global_batch_size: int, seed: int, rows: slice):
        self.data_dir, self.seq_len, self.global_batch_size, self.seed, self.rows = (
            data_dir, seq_len, global_batch_size, seed, rows)
        self._tokens: np.ndarray | None = None
        self.n_starts = len(self.tokens) - seq_len  # starts 0..n-seq_len-1 keep a window inside

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = load_split(self.data_dir, "train")
        return self._tokens

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _tokens=None)

    def starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.n_starts, size=self.global_batch_size)[self.rows]

    def __call__(self, step: int) -> Batch:
        return _windows(self.tokens, self.starts(step), self.seq_len)


def make_train_iterator(data_dir: str | Path, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, prefetch: int = 2):
    """An endless grain DatasetIterator of this process's share of each global batch.

    iterator.get_state() is a JSON-serialisable dict ({"next_index": k}); set_state(state) resumes at
    batch k exactly. prefetch: batches read ahead in one background thread (0: none).
    """
    data_dir = Path(data_dir)
    if global_batch_size % process_count:
        raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by the "
                          f"{process_count} JAX processes; use a multiple of {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    b_local = global_batch_size // process_count
    fn = _StepBatch(data_dir, seq_len, global_batch_size, seed,
                    slice(process_index * b_local, (process_index + 1) * b_local))
    if fn.n_starts < 1:
        raise DataError(f"{data_dir}: the train split has {len(fn.tokens)} tokens, fewer than "
                        f"data.seq_len+1={seq_len + 1}; lower data.seq_len or use a larger corpus")
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(grain.MapDataset.range(2**62).map(fn).to_iter_dataset(options))


def val_batches(data_dir: str | Path, seq_len: int, batch_size: int, n_batches: int) -> list[Batch]:
    """Up to n_batches batches of non-overlapping windows spread evenly over the val split.

    Fewer batches when the split is short; a single smaller batch when it holds fewer than
    batch_size windows. The same data gives the same batches.
    """
    tokens = load_split(data_dir, "val")
    n_windows = len(tokens) // (seq_len + 1)
    if n_windows == 0:
        meta: dict[str, Any] = read_meta(data_dir) or {}
        frac = meta.get("settings", {}).get("val_fraction")
        raise DataError(f"{data_dir}: the val split has {len(tokens)} tokens, fewer than data.seq_len+1="
                        f"{seq_len + 1}; lower data.seq_len or raise data.val_fraction (now {frac})")
    want = min(n_windows, batch_size * n_batches)
    if want >= batch_size:
        want -= want % batch_size  # whole batches only
    slots = np.floor(np.linspace(0, n_windows - 1, want) + 0.5).astype(np.int64)  # distinct: spacing >= 1
    starts = slots * (seq_len + 1)
    step = min(batch_size, len(starts))
    return [_windows(tokens, starts[i:i + step], seq_len) for i in range(0, len(starts), step)]
