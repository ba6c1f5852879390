"""Hugging Face model directories on disk: find one (a local path or a hub id), read its config and
stream its safetensors tensor by tensor, write safetensors shards and their index.

A model directory holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> file). Tensors are read and written
one at a time (the format is a JSON header of names, dtypes, shapes and byte offsets, then the raw
bytes), so a checkpoint is never held twice in memory; the tests read our files back with the
`safetensors` package and transformers.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from atlas_jax.hf.convert import HFError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# What a download fetches: configs, weights, tokenizer files; never pytorch/flax/onnx duplicates.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


def resolve_source(src: str) -> Path:
    """A local model directory, or a hub id downloaded into huggingface_hub's cache."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HFError(f"{src}: not a directory; give a Hugging Face model directory (config.json, "
                          f"model.safetensors, tokenizer files) or a hub id such as openai-community/gpt2")
        return path
    if src.startswith((".", "/", "~")) or not HUB_ID.match(src):
        raise HFError(f"{src}: no such directory; give a Hugging Face model directory or a hub id")
    return _download(src)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFError(f"{repo_id}: not a local directory, and downloading from the hub needs huggingface_hub "
                      f"(pip install 'atlas-lm[hf]'); or pass a local model directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # huggingface_hub's errors differ across versions: classify by name
        kind = type(e).__name__
        if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
            why = "no such model on the Hugging Face hub (or it is private: `hf auth login`)"
        elif kind == "GatedRepoError":
            why = "the model is gated: accept its license on huggingface.co and log in with `hf auth login`"
        elif kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in kind.lower() \
                or "timeout" in kind.lower() or isinstance(e, OSError):
            why = "offline: the Hugging Face hub cannot be reached and the model is not in the local cache"
        else:
            why = f"download failed ({kind}: {' '.join(str(e).split())[:160]})"
        raise HFError(f"{repo_id}: {why}; a local model directory works too (python -m atlas_jax.hf import DIR)") \
            from None


def read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG
    if not path.is_file():
        raise HFError(f"{model_dir}: no {CONFIG}; not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: not a readable JSON config ({type(e).__name__}); re-download the model") from None
    if not isinstance(cfg, dict):
        raise HFError(f"{path}: not a JSON object; re-download the model")
    return cfg


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, sharded (index) or single."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise HFError(f"{index}: not a readable safetensors index (no weight_map); re-download the model") from None
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFError(f"{index}: lists {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                          + f", missing from {model_dir}; re-download the model")
        return files
    if (model_dir / WEIGHTS).is_file():
        return [model_dir / WEIGHTS]
    other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pth"))
    hint = (f"only {other[0]} is there: Atlas reads safetensors (save the model with "
            f"save_pretrained(..., safe_serialization=True))" if other else "re-download the model")
    raise HFError(f"{model_dir}: no {WEIGHTS} or {INDEX}; {hint}")


# safetensors dtype names -> numpy (bf16 through ml_dtypes, which jax depends on)
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _header(f, path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts (format: u64 little-endian
    header length, the header, then the tensors' bytes at their data_offsets)."""
    head = f.read(8)
    if len(head) < 8:
        raise HFError(f"{path}: corrupt or truncated safetensors file (no header); re-download the model")
    n = int.from_bytes(head, "little")
    size = path.stat().st_size
    if n > min(size - 8, 100 << 20):
        raise HFError(f"{path}: corrupt or truncated safetensors file (header length {n}); re-download the model")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HFError(f"{path}: corrupt safetensors file (the header is not JSON); re-download the model") from None
    header.pop("__metadata__", None)
    for name, t in header.items():
        begin, end = t["data_offsets"]
        if 8 + n + end > size:
            raise HFError(f"{path}: corrupt or truncated safetensors file (tensor {name} ends past the file's "
                          f"{size} bytes); re-download the model")
    return header, 8 + n


def iter_tensors(files: Iterable[Path]) -> Iterator[tuple[str, Path, np.ndarray]]:
    """(name, file, float32 array) one tensor at a time, in file order.

    Read with plain file reads into a fresh buffer, not a memory map: mapped pages would count
    toward the process's memory until the whole file is closed, so a 124M model would be held twice."""
    import ml_dtypes

    for path in files:
        with open(path, "rb") as f:
            header, start = _header(f, path)
            for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                kind = ST_DTYPES.get(t["dtype"])
                if kind is None:
                    raise HFError(f"{path}: tensor {name} is {t['dtype']}; Atlas reads F32, F16 and BF16 weights")
                dtype = ml_dtypes.bfloat16 if kind == "bfloat16" else np.dtype(kind)
                begin, end = t["data_offsets"]
                count = int(np.prod(t["shape"], dtype=np.int64))
                if end - begin != count * np.dtype(dtype).itemsize:
                    raise HFError(f"{path}: corrupt safetensors file (tensor {name}: {end - begin} bytes for shape "
                                  f"{t['shape']} {t['dtype']}); re-download the model")
                f.seek(start + begin)
                buf = np.empty(count, dtype=dtype)
                if f.readinto(memoryview(buf).cast("B")) != end - begin:
                    raise HFError(f"{path}: truncated safetensors file at tensor {name}; re-download the model")
                arr = buf.reshape(t["shape"])
                yield name, path, arr if arr.dtype == np.float32 else arr.astype(np.float32)


def shard_name(i: int, n: int) -> str:
    return WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_safetensors(tensors: list[tuple[str, Callable[[], np.ndarray]]], out_dir: Path, max_shard_bytes: int,
                      dtype: str = "float32") -> list[Path]:
    """Write (name, make-the-array) tensors, in order, as shards of at most max_shard_bytes (a tensor
    larger than that gets a shard of its own), plus model.safetensors.index.json when there is more
    than one. One tensor is in memory at a time: a first pass makes each array for its shape only,
    the second writes it straight after the shard's header."""
    cast, st_dtype, itemsize = _caster(dtype)
    shapes = []
    for name, make in tensors:
        shapes.append((name, make().shape))
    plan: list[list[tuple[str, tuple, int]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape, nbytes))
        size += nbytes
    make_of = dict(tensors)
    n, files, weight_map, total = len(plan), [], {}, 0
    for i, shard in enumerate(plan):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned (the format allows space padding)
        final = out_dir / shard_name(i, n)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name, shape, nbytes in shard:
                arr = cast(make_of[name]())
                assert arr.shape == tuple(shape) and arr.nbytes == nbytes, name
                f.write(arr.reshape(-1).view(np.uint8))  # bf16/f16 have no buffer format: bytes
                weight_map[name] = final.name
        tmp.replace(final)
        files.append(final)
        total += offset
    if n > 1:
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n", encoding="utf-8")
    return files


def _caster(dtype: str):
    """-> (cast to a contiguous array of dtype, its safetensors name, bytes per element)."""
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(DTYPES[dtype])
    name = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    return (lambda a: np.ascontiguousarray(np.asarray(a).astype(np_dtype, copy=False))), name, np_dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise HFError(f"--max-shard-size {text}: not a size such as 5GB, 500MB or 1000000 (bytes)")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m[1]) * scale)
    if n < 1:
        raise HFError(f"--max-shard-size {text}: must be at least 1 byte")
    return n
