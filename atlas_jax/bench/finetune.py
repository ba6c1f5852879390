"""`bench finetune`: full fine-tuning against LoRA r=8 against QLoRA-style (nf4 base, r=8) on the
same 124M-shaped llama (configs/llama-125m.yaml's shape, random weights, float32 compute on CPU),
the same batch, side by side in one invocation: trainable params, optimizer-state bytes, the bytes
the frozen base is held in, median step time and peak RSS. Each row runs in its own child process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from atlas_jax.bench.common import REPO, load_avg, log

ROWS = {
    "full fine-tuning": [],
    "LoRA r=8 (all layers)": ["lora.rank=8", "lora.targets=[all]"],
    "QLoRA-style: nf4 base, LoRA r=8": ["lora.rank=8", "lora.targets=[all]", "lora.base_quant=nf4"],
}

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import jax, numpy as np
    from atlas_jax.config import load_config
    from atlas_jax.lora import count, quantize_base, tree_bytes
    from atlas_jax.model import init_params
    from atlas_jax.sharding import global_batch, make_mesh, state_shardings
    from atlas_jax.train_step import abstract_state, create_sharded_state, make_train_step
    cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
    steps, warmup = int(sys.argv[3]), int(sys.argv[4])
    mesh = make_mesh(cfg.train.mesh)
    abstract = abstract_state(cfg)
    shardings = state_shardings(abstract, mesh)
    state, _ = create_sharded_state(cfg, mesh)
    base = base_sh = None
    base_bytes = None
    if cfg.lora.rank:
        host = jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(1)))
        if cfg.lora.base_quant != "none":
            host = quantize_base(host, cfg.lora.base_quant)
        base_bytes = tree_bytes(host)
        base_sh = state_shardings(host, mesh)
        base = jax.device_put(host, base_sh)
        del host
    step = make_train_step(cfg, mesh, shardings, base, base_sh)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    batch = global_batch({"inputs": rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32),
                          "targets": rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32)}, mesh)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    trainable = count(state["params"])
    opt_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state["opt_state"]))
    if base_bytes is None:
        base_bytes = 0
    print(json.dumps({"trainable": trainable, "opt_state_bytes": opt_bytes, "base_bytes": base_bytes,
                      "params_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(state["params"])),
                      "step_s": float(np.median(times)), "tokens_per_s": b * t / float(np.median(times)),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def cmd_finetune(args) -> dict:
    config = args.config or str(REPO / "configs" / ("tiny.yaml" if args.quick else "llama-125m.yaml"))
    steps = args.steps or (2 if args.quick else 5)
    warmup = args.warmup or 1
    common = ["model.compute_dtype=float32", "model.attention=auto", "train.init_from=run:unused",
              "train.batch_size=4", f"data.seq_len={64 if args.quick else 256}", *args.overrides]
    section = {"config": config, "overrides": common, "steps": steps, "load_avg_start": load_avg(), "rows": []}
    for name, extra in ROWS.items():
        log(f"finetune: {name}")
        r = subprocess.run([sys.executable, "-c", CHILD, config, json.dumps([*common, *extra]), str(steps), str(warmup)],
                           capture_output=True, text=True, cwd=REPO)
        if r.returncode:
            raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
        row = {"row": name, **json.loads(r.stdout.strip().splitlines()[-1])}
        section["rows"].append(row)
        log(f"  trainable {row['trainable']:,}, optimizer state {row['opt_state_bytes'] / 2**20:,.1f} MiB, "
            f"base {row['base_bytes'] / 2**20:,.1f} MiB, step {row['step_s']:.3f} s, peak RSS {row['peak_rss_mib']:,.0f} MiB")
    section["load_avg_end"] = load_avg()
    return section
