"""JAX's persistent compilation cache: compiled XLA programs kept on disk, so a second run of the same
train step, sampler or eval step loads them instead of compiling again.

Where: `$ATLAS_COMPILE_CACHE` when it names a directory, else `<ATLAS_CACHE>/jax-compile` (default
`~/.cache/atlas/jax-compile`). `ATLAS_COMPILE_CACHE=0` (or `off`) or an entry point's
`--no-compile-cache` turns it off. Every program is cached, however small or quick to compile (JAX's
defaults skip those under 1 s, which is most CPU programs). JAX keys each entry by the program, the
devices, the jax/jaxlib versions and the XLA flags, so a stale entry is never used; the directory can
be deleted at any time.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import jax

from atlas_jax.files import cache_dir, writable_dir

OFF = ("0", "off", "false", "no")
# The events jax.monitoring records for a compile that consulted the cache.
_EVENTS = {"/jax/compilation_cache/cache_hits": "loaded", "/jax/compilation_cache/cache_misses": "compiled"}
counts: collections.Counter = collections.Counter()  # "loaded" / "compiled" programs in this process
_listening = False


def _count(event: str, **_) -> None:
    if event in _EVENTS:
        counts[_EVENTS[event]] += 1


def cache_path() -> Path | None:
    """The cache directory ATLAS_COMPILE_CACHE / ATLAS_CACHE name, or None when it is switched off."""
    value = os.environ.get("ATLAS_COMPILE_CACHE", "").strip()
    if value.lower() in OFF:
        return None
    return Path(value).expanduser() if value else cache_dir() / "jax-compile"


def setup(enabled: bool = True) -> Path | None:
    """Turn the cache on (or off) for this process and the child processes it starts (through the
    JAX_* environment they read when jax is imported). Call before the first compile. Returns the
    directory, or None when off."""
    global _listening
    path = cache_path() if enabled else None
    if path is None:
        os.environ["ATLAS_COMPILE_CACHE"] = "0"  # children stay off too
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    what = "ATLAS_COMPILE_CACHE" if os.environ.get("ATLAS_COMPILE_CACHE") else "ATLAS_CACHE (its jax-compile/)"
    writable_dir(path, f"{what}; or switch the compile cache off with ATLAS_COMPILE_CACHE=0")
    settings = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return path


def describe() -> str:
    """`compile cache DIR: N programs loaded, M compiled` (so far in this process), or that it is off."""
    path = jax.config.jax_compilation_cache_dir
    if not path:
        return "compile cache off"
    return f"compile cache {path}: {counts['loaded']} programs loaded, {counts['compiled']} compiled"
