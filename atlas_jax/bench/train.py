"""`bench train`: one train step of the same model, batch and params through atlas_jax's jitted
`train_step`, atlas_torch_ref eager and atlas_torch_ref under torch.compile, each framework in a
fresh child process per round, the rounds interleaved."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from atlas_jax.bench.common import (bench_config, flat_params, in_child, load_avg, log, model_summary,
                                    nested_params, peak_flops, record_memory, rss_mib)

FRAMEWORKS = ("atlas_jax", "torch_eager", "torch_compile")


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
    flops_tok = flops_per_token(cfg.model, t)
    section = {"config": source, "model": model_summary(cfg), "batch_size": b, "seq_len": t,
               "microbatches": cfg.train.microbatches,
               "steps": steps, "warmup": warmup, "flops_per_token": flops_tok, "peak_flops": peak,
               "peak_source": peak_src, "peak_flops_torch": torch_peak, "peak_source_torch": torch_src,
               "mfu_label": mfu_label, "load_avg_start": load_avg(), "frameworks": {}}
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
                measure(fw, train_torch, cfg=dataclasses.asdict(c), compile=fw == "torch_compile", device=torch_device(),
                        params_in=params if Path(params).exists() else None)
            if "atlas_jax" in frameworks and configured.model.dropout > 0:  # what a real run of the config costs
                measure(f"atlas_jax dropout {configured.model.dropout:g}", train_atlas_jax,
                        cfg=dataclasses.asdict(configured))
    for fw, results in runs.items():
        section["frameworks"][fw] = summarize_train(pool_rounds(results), b * t, flops_tok,
                                                    peak if fw.startswith("atlas_jax") else torch_peak)
    jax_tps = section["frameworks"]["atlas_jax"].get("tokens_per_s")
    for fw, r in section["frameworks"].items():
        if not fw.startswith("atlas_jax") and jax_tps and "tokens_per_s" in r:
            r["atlas_jax_speedup"] = jax_tps / r["tokens_per_s"]
    section["load_avg_end"] = load_avg()
    return section
