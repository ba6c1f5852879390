"""10 optimizer steps of atlas_jax's train_step equal 10 steps of torch.optim.AdamW on the reference.

Both sides start from the same params and see the same batches; the schedule (linear warmup then
cosine to min_lr), global-norm clipping, the weight-decay mask (matrices decay; norms, biases and,
unless asked, embeddings do not) and 2 microbatches of gradient accumulation are each written
independently on the torch side.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
import torch

from atlas_jax.config import Config, DataConfig, ModelConfig, TrainConfig, resolve
from atlas_jax.sharding import make_mesh
from atlas_jax.train_step import create_sharded_state, make_train_step
from atlas_torch_ref.load import flatten, load_params, params_to_tree
from atlas_torch_ref.model import RefConfig, Transformer as RefTransformer

STEPS = 10


def torch_lr(step: int, t: TrainConfig) -> float:
    """The same schedule, written again: warmup (step+1)/warmup, then cosine from lr to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = min(max((step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1), 0.0), 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))


def torch_train(module: torch.nn.Module, batches, t: TrainConfig) -> list[float]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        is_matrix = p.ndim == 2 and not name.startswith(("embed.", "pos_embed."))
        is_embedding = name.startswith(("embed.", "pos_embed."))
        (decay if is_matrix or (is_embedding and t.decay_embeddings) else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: torch_lr(s, t) / t.lr)
    losses = []
    for batch in batches:
        opt.zero_grad()
        inputs = torch.from_numpy(batch["inputs"]).long()
        targets = torch.from_numpy(batch["targets"]).long()
        total = 0.0
        for m in range(t.microbatches):  # microbatch m: rows m, m+M, ... (any equal split gives the same mean)
            loss = module.loss(inputs[m::t.microbatches], targets[m::t.microbatches]) / t.microbatches
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        losses.append(total)
    return losses


CASES = {
    "llama-gqa-tied": dict(arch="llama", n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "llama-untied-decay-embeddings": dict(arch="llama", n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gpt2": dict(arch="gpt2", n_heads=4, tie_embeddings=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adamw_steps_match_torch(case, observe):
    model = ModelConfig(vocab_size=131, d_model=64, n_layers=2, max_seq_len=16, **CASES[case])
    train = TrainConfig(batch_size=8, microbatches=2, steps=STEPS, lr=3e-3, warmup_steps=3, min_lr=3e-4,
                        weight_decay=0.1, grad_clip=0.5, beta2=0.95, decay_embeddings="decay-embeddings" in case,
                        seed=7, mesh=[1, 1])
    cfg = resolve(Config(model=model, data=DataConfig(seq_len=16), train=train))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, cfg.model.vocab_size, size=(8, 17), dtype=np.int32)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})

    mesh = make_mesh([1, 1])
    state, shardings = create_sharded_state(cfg, mesh)
    ref = RefTransformer(RefConfig.from_mapping(dataclasses.asdict(cfg.model)))
    load_params(ref, jax.device_get(state["params"]))

    step = make_train_step(cfg, mesh, shardings)
    jax_losses = []
    for b in batches:
        state, metrics = step(state, b)
        jax_losses.append(float(metrics["loss"]))
    torch_losses = torch_train(ref, batches, cfg.train)

    np.testing.assert_allclose(jax_losses, torch_losses, rtol=0, atol=1e-5,
                               err_msg=f"{case}: per-step losses diverged")
    got = flatten(jax.device_get(state["params"]))
    want = flatten(params_to_tree(ref))
    assert got.keys() == want.keys()
    # The key bias of gpt2 adds q.b_k to every score of a query row, which softmax ignores: its exact
    # gradient is 0, so both sides hold only rounding noise that Adam scales up to +-lr steps.
    compared = [k for k in got if k[-2:] != ("wk", "bias")]
    assert len(compared) >= len(got) - cfg.model.n_layers
    worst = max(((np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k]), "/".join(k)) for k in compared))
    observe("optimizer: |dparams|/|params| after 10 steps", worst[0])
    assert worst[0] <= 1e-5, f"{case}: after {STEPS} steps {worst[1]} differs by {worst[0]:.2e} (relative)"
