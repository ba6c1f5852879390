"""Time one MoE FFN layer (forward + backward) on this machine for each model.moe_impl.

    python scripts/moe_bench.py [--tokens 512,4096] [--experts 8] [--k 2] [--d-model 192] [--d-ff 512]

Prints ms per call (median of --repeats after a warm-up) for `ragged` (sorted assignments,
jax.lax.ragged_dot) and `dense` (every expert over every token), and the dense SwiGLU with the same
active parameters as a baseline. The numbers behind model.moe_impl=auto are in README.md.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.moe import EXPERT_IMPLS, route


def time_fn(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,4096")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    e, d, f = a.experts, a.d_model, a.d_ff
    w = [jnp.asarray(rng.normal(0, d ** -0.5, s), jnp.float32) for s in ((d, e), (e, d, f), (e, d, f), (e, f, d))]
    print(f"{jax.devices()[0].device_kind}, E={e} k={a.k} D={d} F={f}: ms per forward+backward (median of {a.repeats})")
    for n in (int(t) for t in a.tokens.split(",")):
        x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
        row = {}
        for name, impl in EXPERT_IMPLS.items():
            def loss(ws, x, impl=impl):
                router, *experts = ws
                weights, idx, _ = route(x @ router, a.k)
                return jnp.sum(impl(x, weights, idx, *experts) ** 2)
            row[name] = time_fn(jax.jit(jax.grad(loss)), (w, x), a.repeats)
        dense_w = [jnp.asarray(rng.normal(0, d ** -0.5, s), jnp.float32) for s in ((d, a.k * f), (d, a.k * f), (a.k * f, d))]

        def swiglu(ws, x):
            g, u, dn = ws
            return jnp.sum(((jax.nn.silu(x @ g) * (x @ u)) @ dn) ** 2)
        row[f"dense FFN d_ff={a.k * f} (same active params)"] = time_fn(jax.jit(jax.grad(swiglu)), (dense_w, x), a.repeats)
        print(f"  N={n:>6}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
