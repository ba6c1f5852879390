"""Benchmarks: figures, never pass/fail. Each measurement runs in its own child process.

    python scripts/bench.py train   [--config configs/shakespeare.yaml] [section.key=value ...]
    python scripts/bench.py decode  [--checkpoint RUN_DIR]
    python scripts/bench.py scaling
    python scripts/bench.py quality --checkpoint RUN_DIR
    ... --quick        tiny sizes and few steps: a smoke test, each subcommand under a minute on a
                       quiet 2-core machine (the first torch.compile on a machine adds ~1 minute)

- train: the same model, batch and sequence length through atlas_jax's jitted `train_step`
  (make_mesh + create_sharded_state), atlas_torch_ref eager and atlas_torch_ref under
  torch.compile, from the same initial params, AdamW with the same settings on both sides. Median
  step time after warm-up (pooled over --rounds interleaved rounds), tokens/s, MFU, peak memory,
  atlas_jax's speed-up over each.
- decode: greedy prefill and decode tokens/s at batch 1 and 32, atlas_jax (`sample.generate`)
  against llama.cpp on GGUF files exported from the same params (f32 and q8_0).
- scaling: atlas_jax (and torch eager) tokens/s as the sequence grows and as the model grows.
- quality: every GGUF type of a trained run in llama.cpp against atlas_jax: file size, max
  |dlogit|, top-1 agreement, validation perplexity, greedy continuation.

Results merge into --out (JSON, default docs/benchmarks.json, one section per subcommand) and are
rendered as tables into --md (default: --out with .md) between the `bench:begin/end` markers,
with the machine, the library versions and the exact command of each section.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atlas_jax.errors import AtlasError, run_cli  # noqa: E402

SHAKESPEARE = REPO / "configs" / "shakespeare.yaml"
TINY = REPO / "configs" / "tiny.yaml"
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# Used only when configs/shakespeare.yaml is missing: the shakespeare-ish size of the issue.
FALLBACK_MODEL = {"vocab_size": 2048, "d_model": 256, "n_layers": 4, "n_heads": 4}
FALLBACK_SEQ, FALLBACK_BATCH = 256, 32
SIZES = {"tiny": TINY, "shakespeare": SHAKESPEARE, "124M": REPO / "configs" / "gpt2-124m.yaml"}
FRAMEWORKS = ("atlas_jax", "torch_eager", "torch_compile")
MARK_BEGIN, MARK_END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Settings that change the figures, recorded with each section.
ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP", "OMP_", "MKL_", "MALLOC_", "TORCH", "CUDA_VISIBLE", "LLAMA")


class BenchError(AtlasError):
    pass


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
    return {"cpu": cpu_model(), "cores": cores(), "memory_gib": round(_meminfo("MemTotal") / 2**20, 1),
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


def _meminfo(key: str) -> int:
    """A /proc/meminfo field in KiB (0 where unknown)."""
    try:
        m = re.search(rf"^{key}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        return int(m[1]) if m else 0
    except OSError:
        return 0


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _status_mib(key: str) -> float:
    m = re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    return int(m[1]) / 1024 if m else 0.0


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's high-water RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so
    a spawned child would report its parent's peak when that is larger."""
    return _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(n: int, reps: int = 5) -> float:
    """f32 FLOP/s of one n x n x n jnp.dot on the default device (median of reps)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops(quick: bool) -> tuple[float, str]:
    """The MFU denominator: the device table (atlas_jax.train) on accelerators, a measured matmul on CPU."""
    import jax

    from atlas_jax.train import device_peak_flops

    table = device_peak_flops()
    if table is not None and jax.default_backend() != "cpu":
        return table * jax.device_count(), f"{jax.devices()[0].device_kind} bf16 dense, from the table"
    n = 1024 if quick else 2048
    return matmul_peak_flops(n), f"measured: f32 jnp.dot {n}^3 on {cores()} cores"


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


def _memory(result: dict, rss_before: float, device_bytes: int | None) -> dict:
    result["rss_after_import_mib"] = round(rss_before, 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if device_bytes:
        result["peak_device_mib"] = round(device_bytes / 2**20, 1)
    return result


def random_batches(vocab: int, batch: int, seq: int, n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
             "targets": rng.integers(0, vocab, (batch, seq), dtype=np.int32)} for _ in range(n)]


def _flat_params(params) -> dict[str, np.ndarray]:
    """{'layers_0/attn/wq/kernel': array}: the param paths, as the GGUF table spells them."""
    from atlas_jax.export.gguf import flatten

    return {k: np.asarray(v) for k, v in flatten(params).items()}


def _nested_params(path: str) -> dict:
    """A params .npz written from `_flat_params` -> the nested params dict."""
    out: dict = {}
    with np.load(path) as z:
        for name in z.files:
            node = out
            *parents, leaf = name.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = z[name]
    return out


def train_atlas_jax(cfg: dict, steps: int, warmup: int, params_out: str | None = None) -> dict:
    """atlas_jax's real jitted train step: per-step seconds after warm-up, first loss, memory."""
    import jax

    from atlas_jax.config import from_dict, resolve
    from atlas_jax.sharding import batch_sharding, check_batch_divides, make_mesh
    from atlas_jax.train_step import create_sharded_state, make_train_step

    rss0 = rss_mib()
    c = resolve(from_dict(cfg))
    mesh = make_mesh(c.train.mesh)
    check_batch_divides(c.train.batch_size, c.train.microbatches, mesh)
    state, shardings = create_sharded_state(c, mesh)
    if params_out:
        np.savez(params_out, **_flat_params(state["params"]))
    step = make_train_step(c, mesh, shardings)
    batches = [jax.device_put(b, batch_sharding(mesh))
               for b in random_batches(c.model.vocab_size, c.train.batch_size, c.data.seq_len)]
    t = time.perf_counter()
    state, metrics = step(state, batches[0])
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t
    times = []
    for i in range(1, warmup + steps):
        t = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        metrics["loss"].block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return _memory({"step_s": times, "first_loss": first_loss, "compile_s": compile_s,
                    "device": jax.devices()[0].device_kind}, rss0, stats.get("peak_bytes_in_use"))


def train_torch(cfg: dict, steps: int, warmup: int, compile: bool, params_in: str | None = None,
                device: str = "cpu") -> dict:
    """atlas_torch_ref (eager or torch.compile) + torch AdamW with the config's settings, accumulating
    gradients over train.microbatches as atlas_jax does."""
    import torch

    from atlas_torch_ref import RefConfig, Transformer, load_params

    rss0 = rss_mib()
    m, t_cfg = cfg["model"], cfg["train"]
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    model = Transformer(RefConfig.from_mapping(m))
    if params_in:
        load_params(model, _nested_params(params_in))
    model.to(device)
    # Weight decay as atlas_jax.optim.decay_mask: matrices, embeddings only when asked, never norms or biases.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        is_matrix = isinstance(owner, torch.nn.Linear) and name.endswith("weight")
        is_embed = isinstance(owner, torch.nn.Embedding)
        (decay if is_matrix or (is_embed and t_cfg["decay_embeddings"]) else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t_cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t_cfg["lr"], betas=(t_cfg["beta1"], t_cfg["beta2"]), eps=t_cfg["eps"])
    loss_fn = torch.compile(model.loss) if compile else model.loss
    clip = t_cfg["grad_clip"]

    mb = t_cfg["microbatches"]

    def step(b):
        # Gradient accumulation over the config's microbatches (strided rows, as atlas_jax.train_step).
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for j in range(mb):
            part = loss_fn(b["inputs"][j::mb], b["targets"][j::mb]) / mb
            part.backward()
            loss = loss + part.detach()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()  # waits for the step (and the device)

    batches = [{k: torch.from_numpy(v).long().to(device) for k, v in b.items()}
               for b in random_batches(m["vocab_size"], t_cfg["batch_size"], cfg["data"]["seq_len"])]
    t = time.perf_counter()
    first_loss = step(batches[0])
    compile_s = time.perf_counter() - t
    times = []
    for i in range(1, warmup + steps):
        t = time.perf_counter()
        step(batches[i % len(batches)])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return _memory({"step_s": times, "first_loss": first_loss, "compile_s": compile_s,
                    "device": device, "threads": torch.get_num_threads()}, rss0, peak)


def decode_atlas_jax(params_in: str, model_cfg: dict, prompts: list[list[int]], batches: list[int],
                     new_tokens: int, reps: int) -> dict:
    """Greedy `sample.generate` per batch size, and its prefill alone (the same shapes, jitted)."""
    import jax
    import jax.numpy as jnp

    from atlas_jax.config import ModelConfig, SampleConfig
    from atlas_jax.model import Transformer, init_cache
    from atlas_jax.sample import cache_length, generate, prompt_bucket

    rss0 = rss_mib()
    cfg = ModelConfig(**model_cfg)
    params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, _nested_params(params_in)))
    sample_cfg = SampleConfig(temperature=0.0, max_new_tokens=new_tokens)
    p = len(prompts[0])
    bucket = prompt_bucket(p, cfg.max_seq_len)
    cache_len = cache_length(bucket, new_tokens)

    @jax.jit
    def prefill(params, tokens_BxP, positions_BxP):
        cache = init_cache(cfg, tokens_BxP.shape[0], cache_len)
        logits, _ = Transformer(cfg).apply({"params": params}, tokens_BxP, positions_BxP, cache,
                                           method=Transformer.decode)
        return logits[:, -1]

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))  # compile
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)), out

    out = {}
    for b in batches:
        rows = prompts[:b]
        tokens = np.zeros((b, bucket), np.int32)  # left-padded as sample.generate pads them
        positions = np.full((b, bucket), -1, np.int32)
        tokens[:, bucket - p:] = rows
        positions[:, bucket - p:] = np.arange(p)
        t_gen, (toks, _) = timed(lambda: generate(params, rows, jax.random.key(0), sample_cfg, cfg))
        t_pre, _ = timed(prefill, params, tokens, positions)
        t_dec = max(t_gen - t_pre, 1e-9)
        out[f"batch_{b}"] = {"prefill_tokens_per_s": b * p / t_pre, "decode_tokens_per_s": b * new_tokens / t_dec,
                             "generate_s": t_gen, "prefill_s": t_pre,
                             "greedy_row0": np.asarray(toks)[0].tolist()}
    stats = jax.devices()[0].memory_stats() or {}
    return _memory({"results": out, "device": jax.devices()[0].device_kind}, rss0, stats.get("peak_bytes_in_use"))


def decode_llamacpp(path: str, prompts: list[list[int]], batches: list[int], new_tokens: int, reps: int,
                    n_threads: int) -> dict:
    """Greedy decoding in llama.cpp through the low-level batch API: B sequences in one llama_batch
    (seq ids 0..B-1, a context with n_seq_max=B); argmax of each row's logits on the host."""
    import ctypes

    from llama_cpp import _internals
    from llama_cpp import llama_cpp as lib

    from atlas_jax.export.gguf import GGML_TYPE_F32, open_llama

    rss0 = rss_mib()
    log = tempfile.TemporaryFile()  # llama.cpp's own messages, shown only on failure
    saved_stderr = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        p = len(prompts[0])
        # open_llama: the model with use_extra_bufts off (llama.cpp's AMX bug); its own small context stays unused.
        llm = open_llama(path, n_ctx=p + new_tokens, logits_all=False, n_threads=n_threads)
        vocab = llm.n_vocab()
        out = {}
        for b in batches:
            cp = lib.llama_context_default_params()
            cp.n_ctx, cp.n_seq_max = b * (p + new_tokens), b
            cp.n_batch = cp.n_ubatch = b * p
            cp.n_threads = cp.n_threads_batch = n_threads
            cp.type_k = cp.type_v = GGML_TYPE_F32  # as Atlas' f32 cache (and open_llama)
            ctx = _internals.LlamaContext(model=llm._model, params=cp, verbose=False)
            batch = lib.llama_batch_init(b * p, 0, 1)

            def fill(rows: list[list[int]], pos0: int) -> None:
                n = 0
                for seq, toks in enumerate(rows):
                    for i, tok in enumerate(toks):
                        batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, pos0 + i, 1
                        batch.seq_id[n][0] = seq
                        batch.logits[n] = i == len(toks) - 1
                        n += 1
                batch.n_tokens = n

            def decode() -> None:
                rc = lib.llama_decode(ctx.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")

            def argmax(indices) -> list[int]:
                return [int(np.argmax(np.ctypeslib.as_array(
                    ctypes.cast(lib.llama_get_logits_ith(ctx.ctx, i), ctypes.POINTER(ctypes.c_float)),
                    shape=(vocab,)))) for i in indices]

            pre, dec = [], []
            for _ in range(reps + 1):  # the first run warms up
                lib.llama_memory_clear(lib.llama_get_memory(ctx.ctx), True)
                fill(prompts[:b], 0)
                t = time.perf_counter()
                decode()
                nxt = argmax([(i + 1) * p - 1 for i in range(b)])
                pre.append(time.perf_counter() - t)
                row0 = [nxt[0]]
                t = time.perf_counter()
                for s in range(new_tokens):  # as sample.generate: one model call per new token
                    fill([[x] for x in nxt], p + s)
                    decode()
                    nxt = argmax(range(b))
                    row0.append(nxt[0])
                dec.append(time.perf_counter() - t)
            lib.llama_batch_free(batch)
            ctx.close()
            t_pre, t_dec = float(np.median(pre[1:])), float(np.median(dec[1:]))
            out[f"batch_{b}"] = {"prefill_tokens_per_s": b * p / t_pre, "decode_tokens_per_s": b * new_tokens / t_dec,
                                 "prefill_s": t_pre, "decode_s": t_dec, "greedy_row0": row0[:new_tokens]}
    except Exception as e:
        log.seek(0)
        tail = " | ".join(log.read().decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"{e}; llama.cpp said: {tail}") from None
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    return _memory({"results": out, "device": f"CPU, {n_threads} threads"}, rss0, None)


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


def _cfg_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def summarize_train(raw: dict, tokens_per_step: int, flops_tok: float, peak: float) -> dict:
    if "error" in raw:
        return raw
    med = float(np.median(raw["step_s"]))
    tps = tokens_per_step / med
    out = {"step_s_median": med, "step_s_min": float(np.min(raw["step_s"])), "tokens_per_s": tps,
           "mfu": flops_tok * tps / peak, **raw}
    out["step_s"] = [round(s, 5) for s in raw["step_s"]]
    return out


def torch_device() -> str:
    import jax

    return "cuda" if jax.default_backend() == "gpu" else "cpu"


# --------------------------------------------------------------------------- subcommands


def cmd_train(args) -> dict:
    from atlas_jax.model import flops_per_token

    cfg, source = bench_config(args)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    steps, warmup = args.steps or (3 if args.quick else 10), args.warmup or (1 if args.quick else 2)
    frameworks = args.frameworks.split(",")
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        raise BenchError(f"--frameworks: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FRAMEWORKS)}")
    peak, peak_src = peak_flops(args.quick)
    flops_tok = flops_per_token(cfg.model, t)
    section = {"config": source, "model": model_summary(cfg), "batch_size": b, "seq_len": t,
               "microbatches": cfg.train.microbatches,
               "steps": steps, "warmup": warmup, "flops_per_token": flops_tok, "peak_flops": peak,
               "peak_source": peak_src, "load_avg_start": load_avg(), "frameworks": {}}
    _log(f"train: {source or 'flags'}, batch {b} x seq {t}, {steps} steps after {warmup} warm-up; peak "
         f"{peak / 1e9:,.1f} GFLOP/s ({peak_src})")
    rounds = args.rounds or (1 if args.quick else 3)
    section["rounds"] = rounds
    runs: dict[str, list[dict]] = {}  # framework -> one result per round

    def measure(name: str, fn, **kwargs) -> None:
        """One fresh child per framework per round."""
        got = in_child(fn, steps=steps, warmup=warmup, **kwargs)
        _log(f"  {name}: " + (got["error"] if "error" in got else
                              f"{b * t / np.median(got['step_s']):,.0f} tokens/s"))
        runs.setdefault(name, []).append(got)

    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        params = str(Path(tmp) / "params.npz")
        torch_runs = [(fw, cfg) for fw in frameworks if fw != "atlas_jax"]
        if "torch_eager" in frameworks and cfg.train.microbatches > 1:
            # torch's best may be the whole batch at once: measured too, so no ratio is taken against
            # a setting chosen for atlas_jax.
            torch_runs.append(("torch_eager microbatches 1", _with_microbatches(cfg, 1)))
        configured, _ = bench_config(args, keep_dropout=True)
        # Rounds interleave the frameworks, so a slow spell of a shared machine is spread over all of them.
        for r in range(rounds):
            if rounds > 1:
                _log(f" round {r + 1}/{rounds}")
            # atlas_jax always runs first: it writes the initial params the torch runs start from.
            measure("atlas_jax", train_atlas_jax, cfg=_cfg_dict(cfg), params_out=params if r == 0 else None)
            for fw, c in torch_runs:
                measure(fw, train_torch, cfg=_cfg_dict(c), compile=fw == "torch_compile", device=torch_device(),
                        params_in=params if Path(params).exists() else None)
            if "atlas_jax" in frameworks and configured.model.dropout > 0:  # what a real run of the config costs
                measure(f"atlas_jax dropout {configured.model.dropout:g}", train_atlas_jax,
                        cfg=_cfg_dict(configured))
    for fw, results in runs.items():
        section["frameworks"][fw] = summarize_train(_pool_rounds(results), b * t, flops_tok, peak)
    jax_tps = section["frameworks"]["atlas_jax"].get("tokens_per_s")
    for fw, r in section["frameworks"].items():
        if not fw.startswith("atlas_jax") and jax_tps and "tokens_per_s" in r:
            r["atlas_jax_speedup"] = jax_tps / r["tokens_per_s"]
    section["load_avg_end"] = load_avg()
    return section


def _tokenizer_and_params(args, cfg, tmp: Path):
    """(params as numpy, resolved Config, tokenizer path): a trained run, or random params and a
    tokenizer trained here on the corpus (speed does not depend on the weights)."""
    if args.checkpoint:
        from atlas_jax.checkpoint import load_for_inference

        params, run_cfg, tok_path = load_for_inference(args.checkpoint)
        return params, run_cfg, tok_path
    import jax

    from atlas_jax.config import DataConfig
    from atlas_jax.data.prepare import iter_texts
    from atlas_jax.model import init_params
    from atlas_jax.tokenizer import train_tokenizer

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise BenchError(f"{corpus}: corpus not found; pass --corpus FILE.txt (or --checkpoint RUN_DIR)")
    tok = train_tokenizer(iter_texts([corpus], DataConfig()), tmp / "tokenizer", cfg.model.vocab_size)
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg.model, jax.random.key(cfg.train.seed)))
    return params, cfg, tok.path


def _prompts(tok_path: Path, corpus: Path | None, n: int, length: int) -> list[list[int]]:
    """n windows of `length` real tokens from the corpus (evenly spaced), or random ids without one."""
    from atlas_jax.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    if corpus is not None and corpus.is_file():
        ids = np.asarray(tok.encode(corpus.read_text(encoding="utf-8")[:400_000]), np.int64)
        if len(ids) >= n * length:
            starts = np.linspace(0, len(ids) - length, n).astype(int)
            return [ids[s:s + length].tolist() for s in starts]
    rng = np.random.default_rng(0)
    return rng.integers(4, tok.vocab_size, (n, length)).tolist()


def cmd_decode(args) -> dict:
    from atlas_jax.export.gguf import export_gguf

    batches = [int(x) for x in args.batches.split(",")]
    reps = args.reps or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        tmp = Path(tmp)
        cfg, source = bench_config(args) if not args.checkpoint else (None, None)
        params, cfg, tok_path = _tokenizer_and_params(args, cfg, tmp)
        source = args.checkpoint or source
        m = cfg.model
        new = args.new_tokens or (16 if args.quick else 128)
        p = args.prompt_len or (16 if args.quick else 128)
        if p + new > m.max_seq_len:
            p = max(1, min(p, m.max_seq_len // 2))
            new = m.max_seq_len - p
        prompts = _prompts(tok_path, Path(args.corpus), max(batches), p)
        np.savez(tmp / "params.npz", **_flat_params(params))
        threads = args.threads or cores()
        section = {"config": source, "model": model_summary(cfg), "prompt_len": p, "new_tokens": new,
                   "batches": batches, "reps": reps, "llamacpp_threads": threads,
                   "load_avg_start": load_avg(), "frameworks": {}}
        _log(f"decode: {source or 'flags'}, prompt {p} + {new} new tokens, batches {batches}, greedy")
        res = in_child(decode_atlas_jax, params_in=str(tmp / "params.npz"), model_cfg=dataclasses.asdict(m),
                       prompts=prompts, batches=batches, new_tokens=new, reps=reps)
        section["frameworks"]["atlas_jax"] = res
        _log("  atlas_jax: " + _decode_line(res))
        for ftype in args.ftypes.split(","):
            path = export_gguf(params, m, tok_path, tmp / f"{ftype}.gguf", ftype)
            res = in_child(decode_llamacpp, path=str(path), prompts=prompts, batches=batches, new_tokens=new,
                           reps=reps, n_threads=threads)
            res["gguf_mib"] = round(path.stat().st_size / 2**20, 2)
            section["frameworks"][f"llama.cpp {ftype}"] = res
            _log(f"  llama.cpp {ftype}: " + _decode_line(res))
    ours = section["frameworks"]["atlas_jax"].get("results", {})
    for name, r in section["frameworks"].items():
        if name == "atlas_jax" or "results" not in r:
            continue
        for key, row in r["results"].items():
            if key in ours:
                row["atlas_jax_decode_speedup"] = ours[key]["decode_tokens_per_s"] / row["decode_tokens_per_s"]
                row["atlas_jax_prefill_speedup"] = ours[key]["prefill_tokens_per_s"] / row["prefill_tokens_per_s"]
                a, b = ours[key]["greedy_row0"], row["greedy_row0"]
                row["greedy_same_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                                 min(len(a), len(b)))
    section["load_avg_end"] = load_avg()
    return section


def _decode_line(res: dict) -> str:
    if "error" in res:
        return res["error"]
    return ", ".join(f"{k}: decode {v['decode_tokens_per_s']:,.0f} tok/s, "
                     f"prefill {v['prefill_tokens_per_s']:,.0f} tok/s" for k, v in res["results"].items())


def _pool_rounds(results: list[dict]) -> dict:
    """One framework's rounds as one result: the first round's fields, every round's step times and
    each round's median; a round that failed stands for all."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    return {**results[0], "step_s": [s for r in results for s in r["step_s"]],
            "round_medians": [float(np.median(r["step_s"])) for r in results]}


def _with_microbatches(cfg, microbatches: int):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=microbatches))


def _pick_microbatches(cfg) -> tuple[int, dict[int, float]]:
    """The train.microbatches (1, 2, 4, 8 or 16, dividing the batch) with the fastest atlas_jax step,
    from two timed steps each: the best split trades per-op overhead (many small microbatches)
    against the XLA:CPU temporaries of a big one, and moves with the sequence length."""
    tried = {}
    for m in (1, 2, 4, 8, 16):
        if cfg.train.batch_size % m == 0:
            raw = in_child(train_atlas_jax, cfg=_cfg_dict(_with_microbatches(cfg, m)), steps=2, warmup=1)
            if "error" not in raw:
                tried[m] = float(np.median(raw["step_s"]))
    return (min(tried, key=tried.get) if tried else cfg.train.microbatches), tried


def _train_point(cfg, steps: int, warmup: int, with_torch: bool, peak: float, tune: bool = False) -> dict:
    """atlas_jax (and torch eager) at one size; tune: first pick train.microbatches for atlas_jax
    (`_pick_microbatches`), which both frameworks then use."""
    from atlas_jax.model import flops_per_token

    b, t = cfg.train.batch_size, cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, t)
    point = {"batch_size": b, "seq_len": t, "params": model_summary(cfg)["params"],
             "flops_per_token": flops_tok}
    if tune:
        best, point["microbatch_step_s"] = _pick_microbatches(cfg)
        cfg = _with_microbatches(cfg, best)
    point["microbatches"] = cfg.train.microbatches
    raw = in_child(train_atlas_jax, cfg=_cfg_dict(cfg), steps=steps, warmup=warmup)
    point["atlas_jax"] = summarize_train(raw, b * t, flops_tok, peak)
    if with_torch:
        raw = in_child(train_torch, cfg=_cfg_dict(cfg), steps=steps, warmup=warmup, compile=False,
                       device=torch_device())
        point["torch_eager"] = summarize_train(raw, b * t, flops_tok, peak)
    return point


def _fits_in_memory(cfg) -> tuple[bool, str]:
    """A rough host-memory estimate of one train step (CPU only): 20 bytes/param for params, grads and
    AdamW, plus float32 activations; compared with MemAvailable."""
    from atlas_jax.model import count_params_from_config

    m, tokens = cfg.model, cfg.train.batch_size * cfg.data.seq_len
    n = count_params_from_config(m)["total"]
    acts = tokens * 4 * (m.n_layers * (16 * m.d_model + 3 * m.d_ff + 2 * m.n_heads * cfg.data.seq_len)
                         + 3 * m.vocab_size)
    need, avail = 20 * n + acts, _meminfo("MemAvailable") * 1024
    return need < 0.8 * avail, f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"


def cmd_scaling(args) -> dict:
    import jax

    cpu = jax.default_backend() == "cpu"
    steps, warmup = args.steps or (2 if args.quick else 5), args.warmup or 1
    peak, peak_src = peak_flops(args.quick)
    seq_lens = [int(x) for x in (args.seq_lens or ("32,64" if args.quick else "256,512,1024,2048")).split(",")]
    tokens = args.tokens_per_step or (256 if args.quick else 8192)
    sizes = (args.sizes or ("tiny,shakespeare" if args.quick else "tiny,shakespeare,124M")).split(",")
    with_torch = (not args.quick) if args.torch is None else args.torch
    # model.attention=auto: the grouped einsums on CPU, cuDNN on a GPU in bf16.
    dtype = [f"model.compute_dtype={'float32' if cpu else 'bfloat16'}", "model.attention=auto"]
    _, source = bench_config(args)
    section = {"seq_config": source, "tokens_per_step": tokens, "torch_eager": with_torch, "steps": steps,
               "warmup": warmup, "peak_flops": peak, "peak_source": peak_src, "dtype": dtype,
               "load_avg_start": load_avg(), "seq_len": [], "params": []}
    _log(f"scaling: {tokens} tokens per step; seq lengths {seq_lens} ({source or 'flags'}); sizes {sizes}")
    for t in seq_lens:
        if tokens % t:
            section["seq_len"].append({"seq_len": t, "skipped": f"{t} does not divide --tokens-per-step"})
            continue
        cfg, _ = bench_config(args, extra=dtype + [f"model.max_seq_len={t}", f"data.seq_len={t}",
                                                   f"train.batch_size={tokens // t}", "train.microbatches=1"])
        point = _train_point(cfg, steps, warmup, with_torch, peak, tune=not args.quick)
        section["seq_len"].append(point)
        _log(f"  seq {t}: " + _point_line(point))
    t = seq_lens[0] if args.quick else 256
    for name in sizes:
        path = SIZES.get(name, Path(name))
        if not path.is_file():
            section["params"].append({"name": name, "skipped": f"{path}: no such config"})
            continue
        n_tokens = tokens
        note = None
        if name == "124M" and cpu:  # ~0.75 GFLOP per token: minutes per 8k-token step on a few cores
            n_tokens, note = min(tokens, 2048), "CPU: 2048 tokens per step (8 x 256), atlas_jax only"
        extra = dtype + [f"model.max_seq_len={max(t, 64)}", f"data.seq_len={t}",
                         f"train.batch_size={max(n_tokens // t, 1)}", "train.microbatches=1"]
        sized = argparse.Namespace(**{**vars(args), "config": str(path), "overrides": []})
        cfg, _ = bench_config(sized, extra=extra)
        ok, why = _fits_in_memory(cfg)
        if cpu and not ok:
            section["params"].append({"name": name, "skipped": f"not enough memory: {why}"})
            _log(f"  {name}: skipped, {why}")
            continue
        point = {"name": name, **_train_point(cfg, steps, warmup, with_torch and note is None, peak,
                                              tune=not args.quick and note is None)}
        if note:
            point["note"] = note
        section["params"].append(point)
        _log(f"  {name}: " + _point_line(point))
    section["load_avg_end"] = load_avg()
    png = Path(args.png) if args.png else Path(args.out).with_name("scaling.png")
    plot_scaling(section, png)
    section["png"] = str(png.relative_to(REPO)) if png.resolve().is_relative_to(REPO) else str(png)
    return section


def cmd_quality(args) -> dict:
    """Every GGUF type of a trained run against atlas_jax in llama.cpp: size, logits, perplexity."""
    from atlas_jax.export.gguf import ALL_FTYPES, compare_run_with_llamacpp

    if not args.checkpoint:
        raise BenchError("quality: pass --checkpoint RUN_DIR (a trained run: quality of random weights means little)")
    ftypes = args.ftypes.split(",")
    unknown = [f for f in ftypes if f.removesuffix("-rtn") not in ALL_FTYPES]
    if unknown:
        raise BenchError(f"--ftypes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_FTYPES)} (and q4_0-rtn)")
    section = {"checkpoint": args.checkpoint, "n_windows": args.windows, "load_avg_start": load_avg()}
    _log(f"quality: {args.checkpoint}, {', '.join(ftypes)} on {args.windows} validation windows")
    with tempfile.TemporaryDirectory(prefix="atlas-quality-") as tmp:
        section["types"] = compare_run_with_llamacpp(args.checkpoint, tmp, ftypes, n_windows=args.windows)
    section["load_avg_end"] = load_avg()
    return section


def _point_line(point: dict) -> str:
    parts = []
    for fw in ("atlas_jax", "torch_eager"):
        r = point.get(fw)
        if r:
            parts.append(f"{fw} " + (r["error"] if "error" in r else f"{r['tokens_per_s']:,.0f} tok/s"))
    return "; ".join(parts)


def plot_scaling(section: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for fw, style in (("atlas_jax", "o-"), ("torch_eager", "s--")):
        pts = [(p["seq_len"], p[fw]["tokens_per_s"]) for p in section["seq_len"] if "tokens_per_s" in p.get(fw, {})]
        if pts:
            ax1.plot(*zip(*pts), style, label=fw)
        pts = [(p["params"], p[fw]["tokens_per_s"]) for p in section["params"] if "tokens_per_s" in p.get(fw, {})]
        if pts:
            ax2.plot(*zip(*pts), style, label=fw)
    ax1.set(xlabel="sequence length", ylabel="training tokens/s",
            title=f"sequence length ({section['tokens_per_step']} tokens/step)")
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(bottom=0)
    ax2.set(xscale="log", yscale="log", xlabel="parameters", ylabel="training tokens/s", title="model size")
    for p in section["params"]:
        if "tokens_per_s" in p.get("atlas_jax", {}):
            ax2.annotate(p["name"], (p["params"], p["atlas_jax"]["tokens_per_s"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- output


def _fmt(x, digits: int = 0, suffix: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(r) + " |" for r in [header, align] + rows]


def _md_train(tr: dict) -> list[str]:
    m = tr["model"]
    rows = []
    for fw, r in tr["frameworks"].items():
        if "error" in r:
            rows.append([fw, f"error: {r['error']}"] + [""] * 7)
            continue
        mem = _fmt(r.get("peak_rss_mib"))
        if r.get("peak_device_mib"):
            mem += f" (device {_fmt(r['peak_device_mib'])})"
        per_round = " / ".join(f"{x * 1e3:.0f}" for x in r.get("round_medians", []))
        rows.append([fw, _fmt(r["step_s_median"] * 1e3, 1), per_round, _fmt(r["tokens_per_s"]), f"{r['mfu']:.1%}",
                     mem, _fmt(r["compile_s"], 1), f"{r['first_loss']:.4f}", _fmt(r.get("atlas_jax_speedup"), 2, "x")])
    return [f"### train: {tr['config'] or 'flags'}", "", f"`{tr['command']}`  ",
            f"{m['arch']}, d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']}/{m['n_kv_heads']} heads, "
            f"vocab {m['vocab_size']}, {m['params']:,} params; batch {tr['batch_size']} x seq {tr['seq_len']}; "
            f"dropout 0 (the torch twin has none) except in a 'dropout' row; torch accumulates "
            f"train.microbatches={tr.get('microbatches', 1)} as atlas_jax does except in a 'microbatches 1' row. "
            f"Median of {tr['steps']} steps after {tr['warmup']} warm-up in each of {tr.get('rounds', 1)} rounds "
            f"(a fresh process per framework per round, frameworks interleaved). MFU against {tr['peak_flops'] / 1e9:,.1f} GFLOP/s ({tr['peak_source']}). "
            f"Load average {tr['load_avg_start']} -> {tr['load_avg_end']}.", ""] + _table(
        ["framework", "step (ms)", "per round (ms)", "tokens/s", "MFU", "peak RSS (MiB)", "compile (s)", "first loss",
         "atlas_jax speed-up"], rows) + [""]


def _md_decode(de: dict) -> list[str]:
    m = de["model"]
    rows = []
    for name, r in de["frameworks"].items():
        if "error" in r:
            rows.append([name, f"error: {r['error']}"] + [""] * 5)
            continue
        for key, row in r["results"].items():
            same = row.get("greedy_same_prefix")
            rows.append([name, key.split("_")[1], _fmt(row["prefill_tokens_per_s"]), _fmt(row["decode_tokens_per_s"]),
                         _fmt(r.get("peak_rss_mib")), _fmt(row.get("atlas_jax_decode_speedup"), 2, "x"),
                         "-" if same is None else f"{same}/{de['new_tokens']}"])
    return [f"### decode: {de['config'] or 'flags'}", "", f"`{de['command']}`  ",
            f"{m['arch']}, d_model {m['d_model']}, {m['n_layers']} layers, vocab {m['vocab_size']}, {m['params']:,} "
            f"params; greedy, prompt {de['prompt_len']} tokens + {de['new_tokens']} new per sequence, median of "
            f"{de['reps']}. Decode tokens/s = batch x new tokens / (generate - prefill) for atlas_jax, / the decode "
            f"loop for llama.cpp ({de['llamacpp_threads']} threads, f32 KV cache, batch B = B sequences in one "
            f"llama_batch). Load average {de['load_avg_start']} -> {de['load_avg_end']}.", ""] + _table(
        ["engine", "batch", "prefill tokens/s", "decode tokens/s", "peak RSS (MiB)", "atlas_jax decode speed-up",
         "same greedy tokens (row 0)"], rows) + [""]


def _md_scaling(sc: dict) -> list[str]:
    rows = []
    for p in sc["seq_len"] + sc["params"]:
        label = p.get("name") or f"seq {p['seq_len']}"
        if "skipped" in p:
            rows.append([label, f"skipped: {p['skipped']}"] + [""] * 6)
            continue
        a, t = p.get("atlas_jax", {}), p.get("torch_eager", {})
        speedup = a["tokens_per_s"] / t["tokens_per_s"] if "tokens_per_s" in a and "tokens_per_s" in t else None
        rows.append([label + (f" ({p['note']})" if p.get("note") else ""), _fmt(p["params"]),
                     f"{p['batch_size']} x {p['seq_len']}", str(p.get("microbatches", 1)),
                     a.get("error") or _fmt(a.get("tokens_per_s")),
                     f"{a['mfu']:.1%}" if "mfu" in a else "-", t.get("error") or _fmt(t.get("tokens_per_s")),
                     _fmt(speedup, 2, "x")])
    return ["### scaling", "", f"`{sc['command']}`  ",
            f"{sc['tokens_per_step']} tokens per step (batch x seq), median of {sc['steps']} steps after "
            f"{sc['warmup']} warm-up, {' '.join(sc['dtype'])}, dropout 0; train.microbatches per point is the "
            f"fastest for atlas_jax of 1/2/4/8/16 (two timed steps each; both frameworks then use it); sequence points use "
            f"{sc['seq_config'] or 'the flag sizes'}. MFU against {sc['peak_flops'] / 1e9:,.1f} GFLOP/s. "
            f"Load average {sc['load_avg_start']} -> {sc['load_avg_end']}. Plot: `{sc.get('png')}`.", ""] + _table(
        ["point", "params", "batch x seq", "microbatches", "atlas_jax tokens/s", "MFU", "torch eager tokens/s", "atlas_jax speed-up"],
        rows) + [""]


def _md_quality(q: dict) -> list[str]:
    rows = []
    base = q["types"].get("f32", {}).get("ppl_llamacpp")
    for name, r in q["types"].items():
        change = f"{r['ppl_llamacpp'] / base - 1:+.2%}" if base else ""
        rows.append([name, f"{r['bytes'] / 2**20:.2f}", f"{r['max_abs']:.3g}", f"{r['top1']:.2%}",
                     f"{r['ppl_llamacpp']:.3f}", change, "yes" if r.get("greedy_match") else "no"])
    atlas_ppl = next(iter(q["types"].values()))["ppl_atlas"] if q["types"] else float("nan")
    return [f"### quality: {q['checkpoint']}", "", f"`{q['command']}`  ",
            f"Each type exported from the same checkpoint and run in llama.cpp (llama-cpp-python, f32 KV cache) on "
            f"{q['n_windows']} windows from the head of the validation split; atlas_jax float32 is the reference "
            f"(perplexity {atlas_ppl:.3f}). top-1: positions whose argmax agrees with atlas_jax. q4_0 is GPTQ "
            f"calibrated on the train split (the default of to_gguf.py), q4_0-rtn rounds each weight "
            f"(`--no-calibrate`); both keep the output projection at q8_0. The K-quants come from llama.cpp's "
            f"quantizer; rows that do not split into its 256-blocks fall back per tensor.", ""] + _table(
        ["type", "size (MiB)", "max abs dlogit", "top-1", "ppl (llama.cpp)", "vs f32", "greedy 32 = atlas_jax"],
        rows) + [""]


def render_markdown(data: dict) -> str:
    mach, ver = data.get("machine", {}), data.get("versions", {})
    lines = [f"Machine: {mach.get('cpu')}, {mach.get('cores')} cores, {mach.get('memory_gib')} GiB; jax backend "
             f"{mach.get('jax_backend')} ({mach.get('device_kind')} x{mach.get('device_count')}).",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) + ".", ""]
    for name, render in (("train", _md_train), ("decode", _md_decode), ("scaling", _md_scaling),
                         ("quality", _md_quality)):
        if name in data:
            lines += render(data[name])
            if data[name].get("env"):
                lines += ["Environment: " + ", ".join(f"`{k}={v}`" for k, v in data[name]["env"].items()), ""]
    return "\n".join(lines)


def write_outputs(section_name: str, section: dict, out: Path, md: Path) -> dict:
    data = {}
    if out.is_file():
        try:
            data = json.loads(out.read_text())
        except json.JSONDecodeError:
            data = {}
    data.update({"machine": machine(), "versions": versions(), section_name: section})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    table = render_markdown(data)
    note = f"<!-- written by scripts/bench.py from {out.name}; edits between the markers are replaced -->"
    block = f"{MARK_BEGIN}\n{note}\n\n{table}\n{MARK_END}"
    text = md.read_text() if md.is_file() else "# Benchmarks\n\n"
    if MARK_BEGIN in text and MARK_END in text:
        text = text[:text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    return data


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: configs/shakespeare.yaml; --quick: configs/tiny.yaml)")
    common.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.d_model=256 data.seq_len=256")
    common.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    common.add_argument("--steps", type=int, help="timed steps (default 10; scaling 5; --quick 3/2)")
    common.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 2; --quick 1)")
    common.add_argument("--out", default=str(REPO / "docs" / "benchmarks.json"), help="JSON results (merged)")
    common.add_argument("--md", help="markdown tables (default: --out with .md)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="atlas_jax vs torch eager vs torch.compile, one train step")
    t.add_argument("--rounds", type=int, help="times each framework is run, interleaved (default 3; --quick 1)")
    t.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma list of {', '.join(FRAMEWORKS)}")
    d = sub.add_parser("decode", parents=[common], help="atlas_jax vs llama.cpp greedy decoding")
    d.add_argument("--checkpoint", help="a trained run dir (its params, config and tokenizer)")
    d.add_argument("--corpus", default=str(CORPUS), help="text for the tokenizer and the prompts")
    d.add_argument("--prompt-len", type=int, help="prompt tokens per sequence (default 128; --quick 16)")
    d.add_argument("--new-tokens", type=int, help="generated tokens per sequence (default 128; --quick 16)")
    d.add_argument("--batches", default="1,32", help="batch sizes (sequences decoded together)")
    d.add_argument("--ftypes", default="f32,q8_0", help="GGUF types for llama.cpp")
    d.add_argument("--threads", type=int, help=f"llama.cpp threads (default: the {cores()} cores here)")
    d.add_argument("--reps", type=int, help="timed repetitions (default 3; --quick 1)")
    s = sub.add_parser("scaling", parents=[common], help="tokens/s against sequence length and model size")
    s.add_argument("--seq-lens", help="default 256,512,1024,2048 (--quick 32,64)")
    s.add_argument("--tokens-per-step", type=int, help="batch x seq at every point (default 8192; --quick 256)")
    s.add_argument("--sizes", help=f"configs by name ({', '.join(SIZES)}) or YAML path (default: all three)")
    s.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="torch eager beside atlas_jax (default: yes, except with --quick)")
    s.add_argument("--png", help="the plot (default: scaling.png beside --out)")
    q = sub.add_parser("quality", parents=[common], help="GGUF types in llama.cpp against atlas_jax: size, logits, ppl")
    q.add_argument("--checkpoint", help="a trained run dir")
    q.add_argument("--ftypes", default="f32,f16,bf16,q8_0,q4_0,q4_0-rtn,q4_k_m,q5_k_m,q6_k")
    q.add_argument("--windows", type=int, default=16, help="validation windows of data.seq_len tokens (default 16)")
    args = p.parse_args(argv)

    out = Path(args.out)
    md = Path(args.md) if args.md else out.with_suffix(".md")
    section = {"train": cmd_train, "decode": cmd_decode, "scaling": cmd_scaling,
               "quality": cmd_quality}[args.command](args)
    section["command"] = "python scripts/bench.py " + shlex.join(argv)
    section["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    section["quick"] = args.quick
    data = write_outputs(args.command, section, out, md)
    busy = max(section["load_avg_start"][0], section["load_avg_end"][0])
    if busy > 0.5 * cores():
        _log(f"note: load average {busy} on {cores()} cores while measuring; the figures are noisy")
    print(render_markdown({"machine": data["machine"], "versions": data["versions"], args.command: section}))
    _log(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    run_cli(main)
