"""Known corpora by name, the download cache, and turning `data.sources` entries into files.

A known corpus is looked up in the cache ($ATLAS_CACHE/corpora, default ~/.cache/atlas/corpora)
and downloaded there when missing; either way its sha256 is checked. Offline machines and CI
seed the cache from a local copy with `seed_cache`.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from atlas_jax.errors import DataError
from atlas_jax.files import cache_dir, writable_dir

SOURCE_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Corpus:
    url: str
    sha256: str
    filename: str


CORPORA = {
    "tinyshakespeare": Corpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt"),
}


def _writable_cache(path: Path) -> None:
    """The cache directory of `path`, checked before anything is downloaded or copied into it: a file
    in its place, a parent that is a file, a read-only place are one line naming ATLAS_CACHE."""
    what = ("ATLAS_CACHE" if os.environ.get("ATLAS_CACHE")
            else "the corpus cache (ATLAS_CACHE unset; set it to move the cache)")
    writable_dir(path.parent.parent, what)
    writable_dir(path.parent, f"{what} (its corpora/)")


def corpus_path(name: str) -> Path:
    return cache_dir() / "corpora" / _corpus(name).filename


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise DataError(f"'{name}' is not a known corpus; known: {', '.join(CORPORA)}")
    return CORPORA[name]


def _check(path: Path, corpus: Corpus, what: str, fix: str | None = None) -> None:
    actual = sha256_file(path)
    if actual != corpus.sha256:
        raise DataError(f"{path}: {what} has sha256 {actual}, expected {corpus.sha256}; "
                        f"{fix or f'delete it and copy the original from {corpus.url} there'}")


def fetch(name: str) -> Path:
    """The cached file of a known corpus, downloaded first if missing; its checksum is verified."""
    corpus = _corpus(name)
    path = corpus_path(name)
    if path.is_file():
        _check(path, corpus, f"cached corpus '{name}'")
        return path
    _writable_cache(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(corpus.url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download corpus '{name}' from {corpus.url} ({reason}); offline, seed the cache "
                        f"by copying the file to {path} (sha256 {corpus.sha256})") from None
    try:
        _check(tmp, corpus, f"download of '{name}'")
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def seed_cache(name: str, local_path: str | Path) -> Path:
    """Copy a local copy of a known corpus into the cache (checksum verified) so nothing downloads."""
    corpus = _corpus(name)
    local_path = Path(local_path)
    if local_path.is_dir():
        raise DataError(f"{local_path}: is a directory; give the file of '{name}' ({corpus.filename})")
    if not local_path.is_file():
        raise DataError(f"{local_path}: file not found; cannot seed the cache for '{name}'")
    try:
        _check(local_path, corpus, f"copy of '{name}'",
               fix=f"it is not the original '{name}': give a copy of {corpus.url}")
    except OSError as e:
        raise DataError(f"{local_path}: cannot read it ({e.strerror or type(e).__name__})") from None
    path = corpus_path(name)
    if path.is_file() and sha256_file(path) == corpus.sha256:
        return path  # already seeded: leave it (and its mtime, which prepared shards fingerprint) alone
    _writable_cache(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(local_path, tmp)
        tmp.replace(path)
    except OSError as e:  # a full disk: the cache keeps what it had, no partial file
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: copying '{name}' into the cache failed ({e.strerror or type(e).__name__}); "
                        f"free space or set ATLAS_CACHE to another place") from None
    return path


def resolve_sources(sources: list[str], key: str = "data.sources") -> list[Path]:
    """Each entry -> files: a known corpus name, a file, a directory (its .txt/.jsonl, recursive) or a glob.
    `key` is what errors name: the config key, or a CLI's flag."""
    paths: list[Path] = []
    for entry in sources:
        path = Path(entry).expanduser()
        if entry in CORPORA:
            found = [fetch(entry)]
        elif path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"{key}: '{entry}' is a directory with no .txt or .jsonl files")
        elif glob.has_magic(entry):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{key}: the pattern '{entry}' matches no files; "
                                f"put the corpus there or point {key} at your text")
        else:
            raise DataError(f"{key}: '{entry}' is no file or directory, and not a known corpus "
                            f"({', '.join(CORPORA)})")
        paths.extend(p.resolve() for p in found)
    return list(dict.fromkeys(paths))  # drop repeats, keep order
