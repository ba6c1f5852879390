"""Step-indexed batches of fine-tuning rows, and the fixed val batches.

Global batch k takes positions [k*B, (k+1)*B) of an endless stream that visits every train row once
per epoch, epoch e in the order np.random.default_rng([seed, e]).permutation(N): batch k is a pure
function of (rows, seed, k), so resume needs only k, as for pretraining (data.loader). Process p of
P yields rows [p*B/P, (p+1)*B/P) of the global batch.

SFT batches: {"inputs", "targets", "weights"}, packed ones (data.pack) also "segment_ids" and
"positions" (int32 [B, T], aligned with the inputs); DPO batches: the same three keys prefixed with
"chosen_" and "rejected_", row i of each the same prompt.
"""
from __future__ import annotations

import grain
import numpy as np

from atlas_jax.errors import ConfigError
from atlas_jax.finetune.data import Rows


def as_batch(rows: dict[str, Rows]) -> dict[str, np.ndarray]:
    out = {}
    for prefix, r in rows.items():
        out[f"{prefix}inputs"] = np.ascontiguousarray(r.tokens[:, :-1])
        out[f"{prefix}targets"] = np.ascontiguousarray(r.tokens[:, 1:])
        out[f"{prefix}weights"] = r.weights
        if r.segments is not None:  # packed rows (data.pack): aligned with the inputs
            out[f"{prefix}segment_ids"] = np.ascontiguousarray(r.segments[:, :-1])
            out[f"{prefix}positions"] = np.ascontiguousarray(r.positions[:, :-1])
    return out


class _StepRows:
    def __init__(self, rows: dict[str, Rows], global_batch: int, seed: int, local: slice,
                 extras: dict[str, np.ndarray] | None = None):
        self.rows, self.global_batch, self.seed, self.local = rows, global_batch, seed, local
        self.extras = extras or {}  # per-row arrays added to the batch (DPO's reference log-probs)
        self.n = len(next(iter(rows.values())))

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)[self.local]
        epochs = pos // self.n
        out = np.empty(len(pos), np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(self.n)
            out[epochs == e] = perm[pos[epochs == e] % self.n]
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {**as_batch({k: r.take(idx) for k, r in self.rows.items()}),
                **{k: v[idx] for k, v in self.extras.items()}}


def make_example_iterator(rows: dict[str, Rows], global_batch: int, seed: int, process_index: int = 0,
                          process_count: int = 1, extras: dict[str, np.ndarray] | None = None):
    """An endless grain iterator (get_state / set_state resume at a batch exactly)."""
    if global_batch % process_count:
        raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {process_count} JAX processes")
    b = global_batch // process_count
    fn = _StepRows(rows, global_batch, seed, slice(process_index * b, (process_index + 1) * b), extras)
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    return iter(grain.MapDataset.range(2**62).map(fn).to_iter_dataset(options))


def val_batches(rows: dict[str, Rows], batch_size: int, n_devices: int) -> list[dict[str, np.ndarray]]:
    """All val rows in batches of batch_size (the last one cut to a multiple of the device count)."""
    n = len(next(iter(rows.values())))
    out = []
    for i in range(0, n, batch_size):
        idx = np.arange(i, min(i + batch_size, n))
        idx = idx[:len(idx) // n_devices * n_devices]
        if len(idx):
            out.append(as_batch({k: r.take(idx) for k, r in rows.items()}))
    return out
