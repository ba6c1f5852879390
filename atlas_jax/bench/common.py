"""What every benchmark shares: the repo's paths, the machine and library versions, process memory,
the MFU peak, measurements in child processes (and the params handed to them), the benchmark
config and the progress log."""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib.metadata
import multiprocessing
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

import atlas_jax
from atlas_jax.errors import AtlasError

REPO = Path(atlas_jax.__file__).resolve().parents[1]
SHAKESPEARE = REPO / "configs" / "shakespeare.yaml"
TINY = REPO / "configs" / "tiny.yaml"
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# Used only when configs/shakespeare.yaml is missing: the shakespeare-ish size of the issue.
FALLBACK_MODEL = {"vocab_size": 2048, "d_model": 256, "n_layers": 4, "n_heads": 4}
FALLBACK_SEQ, FALLBACK_BATCH = 256, 32
# Settings that change the figures, recorded with each section.
ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP", "OMP_", "MKL_", "MALLOC_", "TORCH", "CUDA_VISIBLE", "LLAMA")


class BenchError(AtlasError):
    pass


# --------------------------------------------------------------------------- flag values
# argparse `type=` functions: a bad value is argparse's error (one line under run_cli), found before
# any child process, JAX compile or measurement.


def positive_int(text: str) -> int:
    """A whole number >= 1 (steps, rounds, repetitions, token counts, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number; give one >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma list of whole numbers >= 1, e.g. 1,32."""
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"'{text}' has an empty item; give a comma list such as 1,32")
    return [positive_int(t) for t in items]


def names_from(choices):
    """A comma list of names, each one of `choices`."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from "
                                             f"{', '.join(choices)} (a comma list)")
        return items
    parse.__name__ = "names"
    return parse


# --------------------------------------------------------------------------- the machine


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"cpu": cpu_model(), "cores": cores(), "memory_gib": round(meminfo_kib("MemTotal") / 2**20, 1),
            "jax_backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "llama_cpp_python", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def meminfo_kib(key: str) -> int:
    """A /proc/meminfo field in KiB (0 where unknown)."""
    try:
        m = re.search(rf"^{key}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        return int(m[1]) if m else 0
    except OSError:
        return 0


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def status_mib(key: str, pid: int | str = "self") -> float:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM) in MiB; 0.0 where it has none."""
    m = re.search(rf"^{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m[1]) / 1024 if m else 0.0


def rss_mib() -> float:
    return status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's high-water RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so
    a spawned child would report its parent's peak when that is larger."""
    return status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(n: int, reps: int = 5, framework: str = "jax", dtype: str = "float32") -> float:
    """FLOP/s of one n x n x n matmul in `framework` (jax: jnp.dot on the default device; torch:
    torch.mm on the CPU with torch's own threads), median of reps. dtype bfloat16: bf16 operands, as
    the bf16 rows run them (jax accumulating in f32 as the model does on CPU, torch as autocast does)."""
    if framework == "torch":
        import torch

        a = torch.randn(n, n).to(getattr(torch, dtype))
        run = lambda: torch.mm(a, a)  # noqa: E731 (synchronous on the CPU)
    else:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        acc = {} if dtype == "float32" else {"preferred_element_type": jnp.float32}
        dot = jax.jit(lambda x, y: jnp.dot(x, y, **acc))
        run = lambda: dot(a, a).block_until_ready()  # noqa: E731
    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / float(np.median(times))


MFU = "MFU"
CPU_UTIL = "util. vs measured matmul peak"  # the MFU column's name on a CPU: no data-sheet peak there


def peak_flops(quick: bool, framework: str = "jax", dtype: str = "float32") -> tuple[float, str, str]:
    """The MFU denominator, its source and the column's label: the device table (atlas_jax.devices) on
    accelerators (MFU); on a CPU the f32 matmul peak measured in the row's own framework (jax for
    atlas_jax rows, torch for torch rows), so the column is utilisation against that, not MFU."""
    import jax

    from atlas_jax.devices import device_peak

    table = device_peak()
    if table is not None and jax.default_backend() != "cpu":
        return table.flops * jax.device_count(), f"{jax.devices()[0].device_kind} bf16 dense, from the table", MFU
    n = 1024 if quick else 2048
    op = "torch.mm" if framework == "torch" else "jnp.dot"
    short = {"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)
    return (matmul_peak_flops(n, framework=framework, dtype=dtype), f"measured: {short} {op} {n}^3 on {cores()} cores",
            CPU_UTIL)


# --------------------------------------------------------------------------- child processes


def in_child(fn, /, **kwargs) -> dict:
    """fn(**kwargs) in a fresh interpreter, so its memory is its own; a crash becomes {'error': ...}."""
    ctx = multiprocessing.get_context("spawn")
    try:
        with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(fn, **kwargs).result()
    except futures.process.BrokenProcessPool:
        return {"error": f"{fn.__name__}: the child process died (native crash or out of memory)"}
    except Exception as e:  # noqa: BLE001 -- a failed measurement is reported, the others go on
        return {"error": f"{fn.__name__}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def record_memory(result: dict, rss_before: float, device_bytes: int | None) -> dict:
    result["rss_after_import_mib"] = round(rss_before, 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)  # compiles included (XLA's, torch.compile's)
    result["rss_end_mib"] = round(rss_mib(), 1)  # what the running loop holds after its timed steps
    if device_bytes:
        result["peak_device_mib"] = round(device_bytes / 2**20, 1)
    return result


def flat_params(params) -> dict[str, np.ndarray]:
    """{'layers_0/attn/wq/kernel': array}: the param paths, as the GGUF table spells them."""
    from atlas_jax.export.gguf import flatten

    return {k: np.asarray(v) for k, v in flatten(params).items()}


def nested_params(path: str, put=None) -> dict:
    """A params .npz written from `flat_params` -> the nested params dict, read one tensor at a time;
    put(name, array) (e.g. onto a device) is applied to each as it is read, so no second host copy exists."""
    out: dict = {}
    with np.load(path) as z:
        for name in z.files:
            node = out
            *parents, leaf = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = z[name] if put is None else put(name, z[name])
    return out


# --------------------------------------------------------------------------- configs


def bench_config(args, extra: list[str] = (), keep_dropout: bool = False):
    """The resolved Config: --config, else --quick's configs/tiny.yaml, else configs/shakespeare.yaml,
    else the FALLBACK_* sizes; then `extra` and the overrides. Dropout is set to 0 unless
    keep_dropout (atlas_torch_ref has none)."""
    from atlas_jax.config import load_config

    path = Path(args.config) if args.config else (TINY if args.quick else SHAKESPEARE)
    overrides = [] if keep_dropout else ["model.dropout=0.0"]
    if not path.is_file() and not args.config:
        path = None
        overrides += [f"model.{k}={v}" for k, v in FALLBACK_MODEL.items()]
        overrides += [f"model.max_seq_len={FALLBACK_SEQ}", f"data.seq_len={FALLBACK_SEQ}",
                      f"train.batch_size={FALLBACK_BATCH}"]
    overrides += list(extra) + list(args.overrides)
    cfg = load_config(path, overrides)
    return cfg, (str(path.relative_to(REPO)) if path and path.is_relative_to(REPO) else str(path) if path else None)


def model_summary(cfg) -> dict:
    from atlas_jax.model import count_params_from_config

    m = cfg.model
    return {"arch": m.arch, "vocab_size": m.vocab_size, "d_model": m.d_model, "n_layers": m.n_layers,
            "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "d_ff": m.d_ff, "compute_dtype": m.compute_dtype,
            "attention": m.attention, "params": count_params_from_config(m)["total"]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
