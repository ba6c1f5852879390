"""Corpora, token shards and the training iterator.

`ensure_prepared` (atlas_jax.data.prepare; the module keeps the name, so the function `prepare` is not
re-exported here) turns sources into <data_dir>/{tokenizer.model,train.bin,val.bin,meta.json};
`make_train_iterator`/`val_batches` (atlas_jax.data.loader, which imports grain and JAX) read them.
"""
from atlas_jax.data.corpora import CORPORA, fetch, resolve_sources, seed_cache
from atlas_jax.data.prepare import ensure_prepared, load_split, read_meta

__all__ = ["CORPORA", "fetch", "resolve_sources", "seed_cache", "ensure_prepared", "load_split", "read_meta",
           "make_train_iterator", "val_batches"]


def __getattr__(name: str):
    # The loader is imported on first use: grain pulls in JAX, which tokenizer workers do not need.
    if name in ("make_train_iterator", "val_batches"):
        from atlas_jax.data import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'atlas_jax.data' has no attribute '{name}'")
