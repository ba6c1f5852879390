"""Session fixtures: the tinyshakespeare corpus from ../shared, a small tokenizer, prepared shards.

Nothing downloads at test time: ATLAS_CACHE points at a session tmp dir seeded from
<repo>/../shared/data/tinyshakespeare.txt (CI clones the repo with ../shared beside it).

JAX's compile cache is the one place that outlives a session: ATLAS_COMPILE_CACHE (default: the
user's <ATLAS_CACHE>/jax-compile, taken before ATLAS_CACHE is pointed at the tmp dir), so a second
run of the suite, and every `python -m atlas_jax.train` it starts, loads compiled programs instead of
compiling them. ATLAS_COMPILE_CACHE=0 runs the suite without it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from atlas_jax import compile_cache
from atlas_jax.errors import AtlasError
from atlas_jax.files import cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TOKENIZER_VOCAB = 512

# Here, before any test module compiles: the subprocesses the tests start inherit it.
os.environ.setdefault("ATLAS_COMPILE_CACHE", str(cache_dir() / "jax-compile"))
try:
    compile_cache.setup()
except AtlasError:  # a read-only home: the suite runs, compiling everything
    compile_cache.setup(enabled=False)


@pytest.fixture(scope="session", autouse=True)
def atlas_cache(tmp_path_factory) -> Path:
    """ATLAS_CACHE for the whole session (subprocesses inherit it), seeded when ../shared is there."""
    from atlas_jax.data.corpora import seed_cache

    cache = tmp_path_factory.mktemp("atlas_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATLAS_CACHE", str(cache))
        if SHARED_CORPUS.is_file():
            seed_cache("tinyshakespeare", SHARED_CORPUS)
        yield cache


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    if not SHARED_CORPUS.is_file():
        pytest.fail(f"{SHARED_CORPUS} not found; clone the repository with ../shared beside it")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def shakespeare_tokenizer(shakespeare_path, tmp_path_factory):
    """A BPE tokenizer with 512 pieces trained on tinyshakespeare, once per session."""
    from atlas_jax.config import DataConfig
    from atlas_jax.data.prepare import iter_texts
    from atlas_jax.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(iter_texts([shakespeare_path], DataConfig()), out, TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def shakespeare_data_dir(shakespeare_tokenizer, tmp_path_factory) -> Path:
    """tinyshakespeare prepared into train/val shards with `shakespeare_tokenizer` (any seq_len)."""
    from atlas_jax.config import DataConfig
    from atlas_jax.data.prepare import prepare

    data_dir = tmp_path_factory.mktemp("shakespeare_data")
    cfg = DataConfig(sources=["tinyshakespeare"], tokenizer=str(shakespeare_tokenizer.path), num_workers=1)
    prepare(cfg, data_dir, TOKENIZER_VOCAB, log=lambda _: None)
    return data_dir


def pytest_report_header(config):
    return f"tinyshakespeare: {SHARED_CORPUS} ({'found' if SHARED_CORPUS.is_file() else 'MISSING'})"
