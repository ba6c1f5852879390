"""`bench train`: one train step of the same model, batch and params through atlas_jax's jitted
`train_step` and the torch twin (atlas_torch_ref) in the settings of TORCH_SETTINGS (eager, model.loss
under torch.compile, and torch at its best on this machine in f32 and bf16), each framework in a
fresh child process per round, the rounds interleaved."""
from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from pathlib import Path

import numpy as np

from atlas_jax.bench.common import (bench_config, flat_params, in_child, load_avg, log, model_summary,
                                    nested_params, peak_flops, record_memory, rss_mib)

# The torch rows: train_torch's settings per framework.
TORCH_SETTINGS = {
    "torch_eager": {},
    "torch_compile": {"compile": "loss"},  # the twin's math attention, model.loss compiled
    # torch_best: the fastest torch configuration measured on the 2-core box (gpt2 d 192, 4 layers, 6 heads,
    # batch 32 x 128, microbatches 8; ms/step, median of 8 after 3 warm-up, load ~1.2, one run each):
    #   math attention, model.loss compiled (torch_compile)      463
    #   sdpa, model.loss compiled (as nanoGPT), default AdamW     387
    #   sdpa, whole step compiled, default AdamW                  365
    #   sdpa, whole step compiled, AdamW(fused=True)              350   <- torch_best
    # (at 1 thread under load ~3, microbatches 1 was no faster: 698 vs 686 ms.) mode max-autotune-no-cudagraphs
    # was not measured (its CPU GEMM autotuning adds minutes of compile). "The whole step" is one
    # torch.compile of forward + backward + clipping + AdamW; torch.optim graph-breaks around opt.step on
    # purpose, so it runs as two graphs. Inductor's C++ codegen needs a compiler (gcc 12 here) and
    # Python.h: both present. Compile: ~2 min cold on 2 cores, ~15 s from inductor's cache.
    # torch_best_bf16: the same under torch.autocast(bfloat16) (AMX-BF16 / AVX512-BF16 on this CPU), f32
    # master weights and AdamW: 355 ms there, no faster than f32 at d_model 192.
    "torch_best": {"attention": "sdpa", "compile": "step", "fused_adamw": True},
    "torch_best_bf16": {"attention": "sdpa", "compile": "step", "fused_adamw": True, "bf16": True},
}
FRAMEWORKS = ("atlas_jax", *TORCH_SETTINGS)


def random_batches(vocab: int, batch: int, seq: int, n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
             "targets": rng.integers(0, vocab, (batch, seq), dtype=np.int32)} for _ in range(n)]


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
        np.savez(params_out, **flat_params(state["params"]))
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
    return record_memory({"step_s": times, "first_loss": first_loss, "compile_s": compile_s,
                    "device": jax.devices()[0].device_kind}, rss0, stats.get("peak_bytes_in_use"))


def train_torch(cfg: dict, steps: int, warmup: int, compile: str = "none", params_in: str | None = None,
                device: str = "cpu", attention: str = "math", fused_adamw: bool = False,
                compile_mode: str | None = None, bf16: bool = False) -> dict:
    """atlas_torch_ref + torch AdamW with the config's settings, accumulating gradients over
    train.microbatches as atlas_jax does. compile: none (eager) | loss (torch.compile of model.loss, as
    nanoGPT compiles its model) | step (the whole step, zero_grad to opt.step, under one torch.compile);
    compile_mode: torch.compile's mode; attention: the twin's (math | sdpa); fused_adamw: AdamW(fused=True)
    instead of foreach; bf16: the forward under torch.autocast(bfloat16), master weights and AdamW in f32."""
    import contextlib

    import torch

    from atlas_torch_ref import RefConfig, Transformer, load_params

    rss0 = rss_mib()
    m, t_cfg = cfg["model"], cfg["train"]
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    model = Transformer(RefConfig.from_mapping(m, attention=attention))
    if params_in:
        load_params(model, nested_params(params_in))
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
                            lr=t_cfg["lr"], betas=(t_cfg["beta1"], t_cfg["beta2"]), eps=t_cfg["eps"],
                            **({"fused": True} if fused_adamw else {}))
    compiled = functools.partial(torch.compile, mode=compile_mode)
    loss_fn = compiled(model.loss) if compile == "loss" else model.loss
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    clip = t_cfg["grad_clip"]
    mb = t_cfg["microbatches"]

    def update(inputs, targets):
        # Gradient accumulation over the config's microbatches (strided rows, as atlas_jax.train_step).
        loss = 0.0
        for j in range(mb):
            with autocast():
                part = loss_fn(inputs[j::mb], targets[j::mb]) / mb
            part.backward()
            loss = loss + part.detach()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss

    if compile == "step":  # backward() inside a compiled function is traced by compiled autograd
        torch._dynamo.config.trace_autograd_ops = True
    update_fn = compiled(update) if compile == "step" else update

    def step(b):
        opt.zero_grad(set_to_none=True)  # Python only: the grads become None
        return update_fn(b["inputs"], b["targets"]).item()  # waits for the step (and the device)

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
    return record_memory({"step_s": times, "first_loss": first_loss, "compile_s": compile_s,
                    "device": device, "threads": torch.get_num_threads()}, rss0, peak)


def torch_device() -> str:
    import jax

    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def summarize_train(raw: dict, tokens_per_step: int, flops_tok: float, peak: float) -> dict:
    if "error" in raw:
        return raw
    med = float(np.median(raw["step_s"]))
    tps = tokens_per_step / med
    out = {"step_s_median": med, "step_s_min": float(np.min(raw["step_s"])), "tokens_per_s": tps,
           "mfu": flops_tok * tps / peak, **raw}
    out["step_s"] = [round(s, 5) for s in raw["step_s"]]
    return out


def pool_rounds(results: list[dict]) -> dict:
    """One framework's rounds as one result: the first round's fields, every round's step times and
    each round's median; a round that failed stands for all."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    return {**results[0], "step_s": [s for r in results for s in r["step_s"]],
            "round_medians": [float(np.median(r["step_s"])) for r in results]}


def with_microbatches(cfg, microbatches: int):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=microbatches))


def cmd_train(args) -> dict:
    from atlas_jax.model import flops_per_token

    cfg, source = bench_config(args)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    steps, warmup = args.steps or (3 if args.quick else 10), args.warmup or (1 if args.quick else 2)
    frameworks = args.frameworks  # checked by the parser (common.names_from)
    peak, peak_src, mfu_label = peak_flops(args.quick)
    torch_peak, torch_src = (peak, peak_src)
    if any(fw != "atlas_jax" for fw in frameworks) and torch_device() == "cpu":
        torch_peak, torch_src, _ = peak_flops(args.quick, framework="torch")
    bf16_peaks = {}  # the bf16 rows' utilisation: against each framework's own bf16 matmul
    if "torch_best_bf16" in frameworks and torch_device() == "cpu":
        bf16_peaks = {"jax": peak_flops(args.quick, dtype="bfloat16")[:2],
                      "torch": peak_flops(args.quick, framework="torch", dtype="bfloat16")[:2]}
    flops_tok = flops_per_token(cfg.model, t)
    section = {"config": source, "model": model_summary(cfg), "batch_size": b, "seq_len": t,
               "microbatches": cfg.train.microbatches,
               "steps": steps, "warmup": warmup, "flops_per_token": flops_tok, "peak_flops": peak,
               "peak_source": peak_src, "peak_flops_torch": torch_peak, "peak_source_torch": torch_src,
               "mfu_label": mfu_label, "load_avg_start": load_avg(), "frameworks": {},
               "torch_settings": {fw: TORCH_SETTINGS[fw] for fw in frameworks if fw in TORCH_SETTINGS}}
    if bf16_peaks:
        section.update(peak_flops_bf16=bf16_peaks["jax"][0], peak_source_bf16=bf16_peaks["jax"][1],
                       peak_flops_torch_bf16=bf16_peaks["torch"][0], peak_source_torch_bf16=bf16_peaks["torch"][1])
    log(f"train: {source or 'flags'}, batch {b} x seq {t}, {steps} steps after {warmup} warm-up; {mfu_label} "
         f"against {peak / 1e9:,.1f} GFLOP/s ({peak_src}) for atlas_jax, {torch_peak / 1e9:,.1f} GFLOP/s "
         f"({torch_src}) for torch")
    rounds = args.rounds or (1 if args.quick else 3)
    section["rounds"] = rounds
    runs: dict[str, list[dict]] = {}  # framework -> one result per round

    def measure(name: str, fn, **kwargs) -> None:
        """One fresh child per framework per round."""
        got = in_child(fn, steps=steps, warmup=warmup, **kwargs)
        log(f"  {name}: " + (got["error"] if "error" in got else
                              f"{b * t / np.median(got['step_s']):,.0f} tokens/s"))
        runs.setdefault(name, []).append(got)

    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        params = str(Path(tmp) / "params.npz")
        torch_runs = [(fw, cfg) for fw in frameworks if fw != "atlas_jax"]
        if "torch_eager" in frameworks and cfg.train.microbatches > 1:
            # torch's best may be the whole batch at once: measured too, so no ratio is taken against
            # a setting chosen for atlas_jax.
            torch_runs.append(("torch_eager microbatches 1", with_microbatches(cfg, 1)))
        configured, _ = bench_config(args, keep_dropout=True)
        # Rounds interleave the frameworks, so a slow spell of a shared machine is spread over all of them.
        for r in range(rounds):
            if rounds > 1:
                log(f" round {r + 1}/{rounds}")
            # atlas_jax always runs first: it writes the initial params the torch runs start from.
            measure("atlas_jax", train_atlas_jax, cfg=dataclasses.asdict(cfg), params_out=params if r == 0 else None)
            for fw, c in torch_runs:
                measure(fw, train_torch, cfg=dataclasses.asdict(c), **TORCH_SETTINGS[fw.split()[0]], device=torch_device(),
                        params_in=params if Path(params).exists() else None)
            if "atlas_jax" in frameworks and configured.model.dropout > 0:  # what a real run of the config costs
                measure(f"atlas_jax dropout {configured.model.dropout:g}", train_atlas_jax,
                        cfg=dataclasses.asdict(configured))
            if "atlas_jax" in frameworks and "torch_best_bf16" in frameworks and cfg.model.compute_dtype == "float32":
                # bf16 against bf16: torch's autocast row has an atlas_jax row in the same precision.
                measure("atlas_jax bf16", train_atlas_jax, cfg=dataclasses.asdict(
                    dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype="bfloat16"))))
    for fw, results in runs.items():
        jax_row, bf16_row = fw.startswith("atlas_jax"), fw.endswith("bf16") and bool(bf16_peaks)
        row_peak = (bf16_peaks["jax" if jax_row else "torch"][0] if bf16_row else peak if jax_row else torch_peak)
        section["frameworks"][fw] = summarize_train(pool_rounds(results), b * t, flops_tok, row_peak)
    jax_tps = section["frameworks"]["atlas_jax"].get("tokens_per_s")
    for fw, r in section["frameworks"].items():
        if not fw.startswith("atlas_jax") and jax_tps and "tokens_per_s" in r:
            r["atlas_jax_speedup"] = jax_tps / r["tokens_per_s"]
    section["load_avg_end"] = load_avg()
    return section
